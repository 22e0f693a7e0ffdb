#!/usr/bin/env bash
# Two q3c builds side by side on the same checkpoints, alternating, in one run: the check that a change
# leaves generated code no slower.
#
#   benches/before-after.sh OLD_Q3C NEW_Q3C BF16_DIR F32_DIR [ROUNDS]
#
# Each build compiles its own artifacts (LLVM: bf16 weights with bf16 activations, f32, q8; Cranelift; all for
# this CPU, fully fused) and benches them with its own runtime; every round runs old then new for each artifact. Prints every measurement, then the per-round new/old ratios of the means.
set -euo pipefail
OLD=$1 NEW=$2 BF16=$3 F32=$4 ROUNDS=${5:-3}
THREADS=${THREADS:-2}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ARTS=(bf16-act:"$BF16" f32:"$F32" q8:"$BF16" cranelift:"$BF16")
for v in old new; do
  Q=$OLD; [ "$v" = new ] && Q=$NEW
  "$Q" compile "$BF16" --backend llvm --fusion all --bf16-activations -o "$WORK/$v-bf16-act.so"
  "$Q" compile "$F32" --backend llvm --fusion all -o "$WORK/$v-f32.so"
  "$Q" compile "$BF16" --backend llvm --fusion all --quantize q8 -o "$WORK/$v-q8.so"
  "$Q" compile "$BF16" --backend cranelift --fusion all -o "$WORK/$v-cranelift.so"
done
"$NEW" probe --threads "$THREADS"
LOG="$WORK/log"
for round in $(seq "$ROUNDS"); do
  echo "== round $round" | tee -a "$LOG"
  for art in "${ARTS[@]}"; do
    for v in old new; do
      Q=$OLD; [ "$v" = new ] && Q=$NEW
      echo "$v ${art%%:*}" | tee -a "$LOG"
      "$Q" bench --model "$WORK/$v-${art%%:*}.so" --weights "${art#*:}" --threads "$THREADS" \
        --prompt-len 128 --gen 64 --reps 3 | tee -a "$LOG"
    done
  done
done
echo "== new/old, ratio of means per round"
awk '/^(old|new) /{who=$1; art=$2} /^(pp|tg)[0-9]+:/{gsub(/[(]/,""); k=art" "$1; m[who,k,++n[who,k]]=$5; keys[k]=1}
  END{for (k in keys){line=k; for(i=1;i<=n["new",k];i++) line=line sprintf(" %.2f", m["new",k,i]/m["old",k,i]); print line}}' "$LOG" | sort
