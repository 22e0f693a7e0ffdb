#!/usr/bin/env bash
# Several sequences decoding together: q3c `bench --batch B` against llama.cpp's llama-batched-bench on
# the same checkpoint, alternating, in one run (issue 13's batched-decode target).
#
#   benches/batched.sh MODEL_DIR GGUF [ROUNDS] [BATCHES]
#
# MODEL_DIR: a model directory (e.g. `q3c random-weights Qwen3-0.6B --dtype bf16 -o DIR`), GGUF its
# conversion by llama.cpp's convert_hf_to_gguf.py at the same dtype. Needs $LLAMA_BATCHED_BENCH and a q3c
# built with --features llvm ($Q3C, default target/release/q3c). BATCHES: a comma list (default 1,8).
# Each sequence gets its own 128-token prompt, then 64 tokens are decoded per sequence; S_PP and S_TG of
# llama-batched-bench correspond to q3c's pp and aggregate tg.
set -euo pipefail
MODEL=$1 GGUF=$2 ROUNDS=${3:-3} BATCHES=${4:-1,8}
Q3C=${Q3C:-target/release/q3c}
THREADS=${THREADS:-2}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$Q3C" compile "$MODEL" -o "$WORK/model.so"
"$Q3C" probe --threads "$THREADS"
for round in $(seq "$ROUNDS"); do
  echo "== round $round"
  "$LLAMA_BATCHED_BENCH" -m "$GGUF" -c 4096 -b 2048 -ub 512 -npp 128 -ntg 64 -npl "$BATCHES" -t "$THREADS" 2>/dev/null |
    grep -E "^\|"
  for b in ${BATCHES//,/ }; do
    "$Q3C" bench --model "$WORK/model.so" --weights "$MODEL" --threads "$THREADS" --prompt-len 128 --gen 64 \
      --batch "$b" --reps 2 | head -1
  done
done
