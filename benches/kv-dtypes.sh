#!/usr/bin/env bash
# The KV cache's element type, q3c and llama.cpp side by side, alternating, in one run: f16 (both defaults)
# and 8-bit (q3c `--kv-dtype q8`, llama.cpp `-ctk q8_0 -ctv q8_0`, which needs its flash attention).
#
#   benches/kv-dtypes.sh BF16_DIR BF16_GGUF [ROUNDS]
#
# BF16_DIR: a bf16 model directory, BF16_GGUF its conversion by llama.cpp's convert_hf_to_gguf.py (--outtype
# bf16). Needs $LLAMA_BENCH and a q3c built with every backend ($Q3C, default target/release/q3c). Each round:
# pp2048, then tg32 at each depth of $DEPTHS (default 2048,4096), llama.cpp first, f16 then q8. Prints every
# measurement.
set -euo pipefail
BF16=$1 GGUF=$2 ROUNDS=${3:-3}
Q3C=${Q3C:-target/release/q3c}
THREADS=${THREADS:-2}
DEPTHS=${DEPTHS:-2048,4096}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$Q3C" compile "$BF16" -o "$WORK/f16.so"
"$Q3C" compile "$BF16" --kv-dtype q8 -o "$WORK/q8.so"
"$Q3C" probe --threads "$THREADS"
for round in $(seq "$ROUNDS"); do
  echo "== round $round"
  for kv in f16 q8_0; do
    echo "llama.cpp $kv KV"
    "$LLAMA_BENCH" -m "$GGUF" -t "$THREADS" -ctk "$kv" -ctv "$kv" -fa 1 -p 2048 -n 0 -r 1 -o md 2>/dev/null \
      | grep -E "pp[0-9]+"
    "$LLAMA_BENCH" -m "$GGUF" -t "$THREADS" -ctk "$kv" -ctv "$kv" -fa 1 -p 0 -n 32 -d "$DEPTHS" -r 1 -o md \
      2>/dev/null | grep -E "tg[0-9]+"
  done
  for kv in f16 q8; do
    echo "q3c $kv KV pp2048"
    "$Q3C" bench --model "$WORK/$kv.so" --weights "$BF16" --threads "$THREADS" --prompt-len 2048 --gen 0 --reps 1 \
      | head -1
    for d in ${DEPTHS//,/ }; do
      echo "q3c $kv KV tg32 @ d$d"
      "$Q3C" bench --model "$WORK/$kv.so" --weights "$BF16" --threads "$THREADS" --prompt-len 1 --gen 32 \
        --depth "$d" --reps 1 | sed -n 2p
    done
  done
done
