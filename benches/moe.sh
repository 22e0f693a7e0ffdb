#!/usr/bin/env bash
# Mixture-of-experts prefill and decode: q3c (LLVM, fusion all) at bf16 (f32 and bf16 activations), q8 and q4
# next to llama.cpp at BF16, Q8_0 and Q4_0 on the same checkpoint, alternating, in one run. (`bf16` is the
# artifact with f32 activations, `bf16-act` the default for a bf16 checkpoint on an AVX512_BF16 CPU.)
#
#   benches/moe.sh MODEL_DIR BF16_GGUF Q8_0_GGUF Q4_0_GGUF [ROUNDS]
#
# MODEL_DIR: a bf16 checkpoint (e.g. `q3c random-weights CONFIG --dtype bf16`, CONFIG a Qwen3-30B-A3B
# config.json cut to 4 layers); BF16_GGUF its conversion by llama.cpp's convert_hf_to_gguf.py
# (--outtype bf16), Q8_0_GGUF and Q4_0_GGUF made from it by llama-quantize. Needs $LLAMA_BENCH and a q3c
# built with --features llvm ($Q3C, default target/release/q3c). With $OLD_Q3C (an earlier build) its
# artifacts run in the same rounds, for before/after figures. Prints every measurement.
set -euo pipefail
MODEL=$1 BF16_GGUF=$2 Q8_GGUF=$3 Q4_GGUF=$4 ROUNDS=${5:-3}
Q3C=${Q3C:-target/release/q3c}
THREADS=${THREADS:-2}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
compile() { # BUILD NAME FLAGS...
  local q3c=$1 name=$2
  shift 2
  "$q3c" compile "$MODEL" --backend llvm --fusion all "$@" -o "$WORK/$name.so"
}
ARTS=()
for build in new ${OLD_Q3C:+old}; do
  q3c=$Q3C
  [ "$build" = old ] && q3c=$OLD_Q3C
  # f32 activations (the default before bf16 checkpoints got bf16 activations; older builds lack the flag).
  F32=()
  [ "$build" = new ] && F32=(--activations f32)
  compile "$q3c" "$build-bf16" "${F32[@]}" && ARTS+=("$build-bf16")
  compile "$q3c" "$build-bf16-act" --bf16-activations && ARTS+=("$build-bf16-act")
  compile "$q3c" "$build-q8" --quantize q8 && ARTS+=("$build-q8")
  if compile "$q3c" "$build-q4" --quantize q4 2>/dev/null; then ARTS+=("$build-q4"); fi
done
"$Q3C" probe --threads "$THREADS"
for round in $(seq "$ROUNDS"); do
  echo "== round $round"
  "$LLAMA_BENCH" -m "$BF16_GGUF" -m "$Q8_GGUF" -m "$Q4_GGUF" -t "$THREADS" -p 128,512 -n 32 -r 2 -o md 2>/dev/null |
    grep -E "pp128|pp512|tg32"
  for art in "${ARTS[@]}"; do
    echo "q3c $art"
    for pp in 128 512; do
      gen=0
      [ "$pp" = 128 ] && gen=32
      "$Q3C" bench --model "$WORK/$art.so" --weights "$MODEL" --threads "$THREADS" --prompt-len "$pp" \
        --gen "$gen" --reps 2 | grep -E "^(pp|tg)[0-9]+: [1-9]"
    done
  done
done
