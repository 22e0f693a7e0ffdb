#!/usr/bin/env bash
# A MoE model sharded over N processes with its MoE layers split by features (the default) or by experts
# (`--moe-split experts`), alternating, in one run: prefill and decode tok/s and resident memory per rank.
#
#   benches/moe-split.sh MODEL_DIR [ROUNDS] [RANKS]
#
# MODEL_DIR: a MoE model directory (e.g. `q3c random-weights` of a cut-down Qwen3-30B-A3B config). Needs a
# q3c built with --features llvm,mpi ($Q3C, default target/release/q3c) and mpirun. RANKS: a comma list
# (default 2,4). One host's ranks share its cores: past the core count they take turns.
set -euo pipefail
MODEL=$1 ROUNDS=${2:-3} RANKS=${3:-2,4}
Q3C=${Q3C:-target/release/q3c}
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl=self,vader
[ "$(id -u)" -eq 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$Q3C" probe --threads "$(nproc)"
"$Q3C" compile "$MODEL" -o "$WORK/1-features.so"
variants=(1-features)
for n in ${RANKS//,/ }; do
  for split in features experts; do
    "$Q3C" compile "$MODEL" --shards "$n" --moe-split "$split" -o "$WORK/$n-$split.so"
    variants+=("$n-$split")
  done
done
for round in $(seq "$ROUNDS"); do
  for v in "${variants[@]}"; do
    n=${v%%-*}
    for pl in 128 512; do
      args=(bench --model "$WORK/$v.so" --weights "$MODEL" --prompt-len "$pl" --gen 32 --reps 2 --json)
      if [ "$n" = 1 ]; then
        out=$("$Q3C" "${args[@]}" --threads "$(nproc)" 2>/dev/null)
      else
        out=$(mpirun -np "$n" "$Q3C" "${args[@]}" 2>/dev/null)
      fi
      python3 -c 'import json,sys; d=json.loads(sys.argv[2]); print(sys.argv[1], "pp%d %.0f tok/s, tg32 %.1f tok/s, resident %.2f GB" % (d["prompt_len"], d["prefill_mean_tok_s"], d["decode_mean_tok_s"], d["resident_after_load_bytes"] / 1e9))' "round $round $v" "$out"
    done
  done
done
