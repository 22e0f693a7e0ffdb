#!/usr/bin/env bash
# The GPU check of issue 16, in two halves (a GPU machine here is lent without Rust or LLVM):
#
#   benches/gpu.sh prepare DIR   here: a q3c and the CUDA test binary built with `--features cuda` (no LLVM
#                                needed to run), and CUDA artifacts of every golden fixture (f32 activations;
#                                f32 KV for sm_90, with programmatic launches; f16 KV for sm_80; the untied ones
#                                also with q8 and q4 weights; tied_bf16 also with bf16 activations, its
#                                tensor-core kernels) and of the Qwen3-0.6B and Qwen3-8B shapes (bf16 weights
#                                with the default bf16 activations and with f32 ones; q8, q4 weights), all into
#                                DIR (with this script);
#                                with BASE=path/to/an/older/q3c also that compiler's artifacts of both shapes
#                                (base-*.q3c), which the run then times against these in alternating rounds
#   bash DIR/gpu.sh run DIR      on the GPU machine, from the repository root: the CUDA tests on the fixtures,
#                                a device-to-device copy (the bandwidth roof, through PyTorch where present),
#                                then q3c bench of both shapes on random bf16 weights made there: prefill 512,
#                                decode after 512 and after 16 tokens, 8 sequences together, f32 against bf16
#                                activations (tensor-core prefill) and programmatic launches off and on in
#                                alternating rounds, q8 and q4 weights, a profiled prefill and decode;
#                                QUICK=1 keeps only the tests, the activation rounds and the rounds against
#                                BASE (device time is scarce)
#   SWEEP='threads=128;rows=2,streams=8'  (prepare) also the Qwen3-8B artifact compiled with each product shape
#                                (`Q3C_GPU_PRODUCTS`, backends/llvm/src/gpu_gemm.rs; the tensor-core kernels'
#                                too: `tensor_rows=32;group=2;tensor_chunks=1`), which the run times in
#                                alternating rounds (prefill 128, decode after 128) and profiles once each
set -euo pipefail
what=${1:?prepare DIR | run DIR}
dir=$(realpath -m "${2:?DIR}")
case "$what" in
  prepare)
    cd "$(dirname "$0")/.."
    mkdir -p "$dir"
    cargo build --release -q --features llvm,cuda -p q3c
    CARGO_TARGET_DIR=target/gpu cargo build --release -q -p q3c --features cuda
    test=$(CARGO_TARGET_DIR=target/gpu cargo test --release -q -p q3c-tests --features cuda --test cuda --no-run \
      --message-format=json | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
    cp target/gpu/release/q3c "$dir/q3c"; cp "$test" "$dir/cuda-test"; strip "$dir/q3c" "$dir/cuda-test"
    fixture() { target/release/q3c compile "tests/reference/fixtures/$1" --target cuda --max-tokens 64 "${@:3}" \
      -o "$dir/$2.q3c" 2>/dev/null; }
    for f in dense_gqa tied_bf16 moe moe_sparse_step yarn sharded_f16; do
      fixture "$f" "$f-f32" --gpu sm_90 --kv-dtype f32 --activations f32
      fixture "$f" "$f-f16" --gpu sm_80 --kv-dtype f16 --activations f32
    done
    fixture tied_bf16 tied_bf16-f32-bf16-activations --gpu sm_90 --kv-dtype f32 --activations bf16
    for f in dense_gqa moe moe_sparse_step yarn sharded_f16; do
      for q in q8 q4; do fixture "$f" "$f-f32-$q" --gpu sm_90 --kv-dtype f32 --quantize "$q"; done
    done
    for m in 0.6B:q06 8B:q8b; do
      target/release/q3c compile "Qwen3-${m%%:*}" --target cuda --gpu sm_90 --max-tokens 512 -o "$dir/${m##*:}.q3c"
      target/release/q3c compile "Qwen3-${m%%:*}" --target cuda --gpu sm_90 --max-tokens 512 --activations f32 \
        -o "$dir/${m##*:}-f32act.q3c"
      for q in q8 q4; do
        target/release/q3c compile "Qwen3-${m%%:*}" --target cuda --gpu sm_90 --max-tokens 512 --quantize "$q" \
          -o "$dir/${m##*:}-$q.q3c"
      done
    done
    if [ -n "${BASE:-}" ]; then
      "$BASE" compile Qwen3-0.6B --target cuda --gpu sm_90 --max-tokens 512 -o "$dir/base-q06.q3c"
      "$BASE" compile Qwen3-8B --target cuda --gpu sm_90 --max-tokens 512 -o "$dir/base-q8b.q3c"
    fi
    rm -f "$dir"/sweep-*.q3c "$dir/sweep.txt"
    if [ -n "${SWEEP:-}" ]; then
      i=0
      IFS=';' read -ra shapes <<< "$SWEEP"
      for shape in "${shapes[@]}"; do
        i=$((i + 1))
        Q3C_GPU_PRODUCTS="$shape" target/release/q3c compile Qwen3-8B --target cuda --gpu sm_90 --max-tokens 512 \
          -o "$dir/sweep-$i.q3c" >/dev/null
        echo "$i $shape" >> "$dir/sweep.txt"
      done
    fi
    cp "$0" "$dir/gpu.sh"
    ;;
  run)
    # A failing step is reported and the next one runs: the device time is counted.
    set +e +o pipefail
    # The tests find the fixtures where they were built: /work/main here.
    mkdir -p /work && { [ -e /work/main ] || ln -sfn "$PWD" /work/main; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    export Q3C_CUDA_ARTIFACTS=$dir
    echo "== tests"; timeout 150 "$dir/cuda-test" --nocapture --test-threads 1 2>&1 | grep -v "running on" | tail -40
    quick=${QUICK:-}
    if [ -z "$quick" ]; then
      echo "== copy bandwidth"
      timeout 60 python3 -c '
import torch
x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(10): y.copy_(x)
e.record(); torch.cuda.synchronize(); ms = s.elapsed_time(e) / 10
print(f"d2d copy of 4 GiB: {ms:.3f} ms, {2 * x.numel() / ms / 1e6:.0f} GB/s (read + write)")'
    fi
    b() { timeout 150 "$dir/q3c" bench "$@" 2>&1 | grep -v "^(16 threads\|^loaded"; }
    # MODEL ARTIFACT REPS: random weights, prefill 512, decode after 512 and 16 tokens, 8 sequences.
    shape() {
      echo "== $1"
      timeout 150 "$dir/q3c" random-weights "$1" -o "/tmp/w-$2" 2>&1 | tail -1
      w=(--model "$dir/$2.q3c" --weights "/tmp/w-$2")
      if [ -z "$quick" ]; then
        b "${w[@]}" --prompt-len 512 --gen 64 --reps "$3"
        b "${w[@]}" --prompt-len 16 --gen 128 --reps "$3"
        b "${w[@]}" --batch 8 --prompt-len 128 --gen 32 --reps 1
      fi
      # f32 activations (FMA blocks everywhere) against the default bf16 (tensor cores from 64 rows),
      # alternating rounds; then one profiled prefill of each.
      for round in 1 2; do
        for act in f32act bf16; do
          m="$dir/$2.q3c"; [ "$act" = f32act ] && m="$dir/$2-f32act.q3c"
          echo "-- round $round, activations ${act%act}"
          b --model "$m" --weights "/tmp/w-$2" --prompt-len 512 --gen 16 --reps 1
          b --model "$m" --weights "/tmp/w-$2" --prompt-len 16 --gen 64 --reps 1
        done
      done
      for act in f32act bf16; do
        m="$dir/$2.q3c"; [ "$act" = f32act ] && m="$dir/$2-f32act.q3c"
        echo "-- profile, prefill 512, activations ${act%act}"
        Q3C_CUDA_PROFILE=1 timeout 100 "$dir/q3c" bench --model "$m" --weights "/tmp/w-$2" --prompt-len 512 \
          --gen 1 --reps 1 2>&1 | grep -E "kernel time|_linear|_swiglu" | head -12
      done
      # Programmatic launches off and on (same artifact, same weights), alternating rounds.
      for round in 1 2; do
        for pdl in 0 1; do
          echo "-- round $round, programmatic launches $pdl"
          Q3C_CUDA_PDL=$pdl b "${w[@]}" --prompt-len 512 --gen 32 --reps 1
          Q3C_CUDA_PDL=$pdl b "${w[@]}" --prompt-len 16 --gen 64 --reps 1
        done
      done
      # Quantized weights (quantized at load from the same bf16 weights).
      for q in q8 q4; do
        [ -e "$dir/$2-$q.q3c" ] || continue
        echo "-- $q weights"
        b --model "$dir/$2-$q.q3c" --weights "/tmp/w-$2" --prompt-len 512 --gen 64 --reps 2
        b --model "$dir/$2-$q.q3c" --weights "/tmp/w-$2" --prompt-len 16 --gen 128 --reps 2
      done
      # Against the older compiler's artifact (same runtime, same weights), alternating rounds.
      if [ -e "$dir/base-$2.q3c" ]; then
        for round in 1 2; do
          for which in base new; do
            m="$dir/$2.q3c"; [ "$which" = base ] && m="$dir/base-$2.q3c"
            echo "-- round $round, $which"
            b --model "$m" --weights "/tmp/w-$2" --prompt-len 512 --gen 32 --reps 1
            b --model "$m" --weights "/tmp/w-$2" --prompt-len 16 --gen 64 --reps 1
          done
        done
      fi
    }
    shape Qwen3-0.6B q06 3
    shape Qwen3-8B q8b 2
    if [ -e "$dir/sweep.txt" ]; then
      echo "== product shapes (Qwen3-8B: prefill 128, decode after 128)"
      for round in 1 2; do
        while read -r i spec; do
          echo "-- round $round, shape $i ($spec)"
          b --model "$dir/sweep-$i.q3c" --weights /tmp/w-q8b --prompt-len 128 --gen 64 --reps 2
        done < "$dir/sweep.txt"
      done
      while read -r i spec; do
        echo "-- profile, shape $i ($spec)"
        Q3C_CUDA_PROFILE=1 timeout 100 "$dir/q3c" bench --model "$dir/sweep-$i.q3c" --weights /tmp/w-q8b \
          --prompt-len 16 --gen 32 --reps 1 2>&1 | grep -E "q3c_k|kernel time"
      done < "$dir/sweep.txt"
    fi
    if [ -z "$quick" ]; then
      echo "== profile (8B, decode after 16 tokens)"
      Q3C_CUDA_PROFILE=1 timeout 100 "$dir/q3c" bench "${w[@]}" --prompt-len 16 --gen 32 --reps 1 2>&1 | tail -24
    fi
    ;;
  *) echo "usage: benches/gpu.sh prepare DIR | run DIR" >&2; exit 2 ;;
esac
