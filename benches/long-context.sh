#!/usr/bin/env bash
# q3c and llama.cpp side by side on long prompts and decode at depth, alternating, in one run.
#
#   benches/long-context.sh BF16_DIR BF16_GGUF [ROUNDS]
#
# BF16_DIR: a bf16 model directory (e.g. `q3c random-weights Qwen3-0.6B --dtype bf16` with the tokenizer
# copied in), BF16_GGUF its conversion by llama.cpp's convert_hf_to_gguf.py (--outtype bf16). Needs
# $LLAMA_BENCH and a q3c built with every backend ($Q3C, default target/release/q3c). Each round: pp512 and
# pp2048, then tg32 at depth 2048 (and 8192 with DEEP=1), llama.cpp first (f16 KV cache, its default), then
# q3c's default artifact (bf16 activations and an f16 KV cache for a bf16 checkpoint on an AVX512_BF16 CPU, as
# llama.cpp computes) and the same with `--kv-dtype f32`. Prints every measurement.
set -euo pipefail
BF16=$1 GGUF=$2 ROUNDS=${3:-3}
Q3C=${Q3C:-target/release/q3c}
THREADS=${THREADS:-2}
DEPTHS=2048
[ -n "${DEEP:-}" ] && DEPTHS="2048,8192"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$Q3C" compile "$BF16" -o "$WORK/bf16.so"
"$Q3C" compile "$BF16" --kv-dtype f32 -o "$WORK/kv-f32.so"
"$Q3C" probe --threads "$THREADS"
for round in $(seq "$ROUNDS"); do
  echo "== round $round"
  "$LLAMA_BENCH" -m "$GGUF" -t "$THREADS" -p 512,2048 -n 0 -r 1 -o md 2>/dev/null | grep -E "pp[0-9]+"
  "$LLAMA_BENCH" -m "$GGUF" -t "$THREADS" -p 0 -n 32 -d "$DEPTHS" -r 1 -o md 2>/dev/null | grep -E "tg[0-9]+"
  for art in bf16 kv-f32; do
    for p in 512 2048; do
      echo "q3c $art pp$p"
      "$Q3C" bench --model "$WORK/$art.so" --weights "$BF16" --threads "$THREADS" --prompt-len "$p" --gen 0 --reps 1 | head -1
    done
    for d in ${DEPTHS//,/ }; do
      echo "q3c $art tg32 @ d$d"
      "$Q3C" bench --model "$WORK/$art.so" --weights "$BF16" --threads "$THREADS" --prompt-len 1 --gen 32 --depth "$d" --reps 1 | sed -n 2p
    done
  done
done
