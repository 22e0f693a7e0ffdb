#!/usr/bin/env bash
# q3c (LLVM backend) and llama.cpp side by side on the same checkpoints, alternating, in one run.
#
#   benches/vs-llama-cpp.sh BF16_DIR F32_DIR BF16_GGUF F32_GGUF [ROUNDS]
#
# BF16_DIR/F32_DIR: model directories (e.g. from `q3c random-weights Qwen3-0.6B --dtype bf16|f32`), the GGUFs
# their conversions by llama.cpp's convert_hf_to_gguf.py at the same dtype. Needs $LLAMA_BENCH (llama-bench)
# and a q3c built with --features llvm ($Q3C, default target/release/q3c). With $Q8_GGUF (BF16_DIR converted
# with --outtype q8_0) it also compares q3c's `--quantize q8` with llama.cpp's Q8_0. Prints every measurement.
set -euo pipefail
BF16=$1 F32=$2 BF16_GGUF=$3 F32_GGUF=$4 ROUNDS=${5:-3}
Q3C=${Q3C:-target/release/q3c}
THREADS=${THREADS:-2}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$Q3C" compile "$BF16" --backend llvm --fusion all --activations f32 -o "$WORK/bf16.so"
"$Q3C" compile "$BF16" --backend llvm --fusion all --bf16-activations -o "$WORK/bf16-act.so"
"$Q3C" compile "$F32" --backend llvm --fusion all -o "$WORK/f32.so"
"$Q3C" compile "$BF16" --backend llvm --fusion all --quantize q8 -o "$WORK/q8.so"
"$Q3C" probe --threads "$THREADS"
for round in $(seq "$ROUNDS"); do
  echo "== round $round"
  Q8_MODEL=()
  ARTS=(bf16:"$BF16" bf16-act:"$BF16" f32:"$F32")
  if [ -n "${Q8_GGUF:-}" ]; then Q8_MODEL=(-m "$Q8_GGUF"); ARTS+=(q8:"$BF16"); fi
  "$LLAMA_BENCH" -m "$BF16_GGUF" -m "$F32_GGUF" "${Q8_MODEL[@]}" -t "$THREADS" -p 128 -n 64 -r 3 -o md 2>/dev/null | grep -E "pp128|tg64"
  for art in "${ARTS[@]}"; do
    echo "q3c ${art%%:*}"
    "$Q3C" bench --model "$WORK/${art%%:*}.so" --weights "${art#*:}" --threads "$THREADS" --prompt-len 128 --gen 64 --reps 3
  done
done
