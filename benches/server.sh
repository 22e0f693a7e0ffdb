#!/usr/bin/env bash
# q3c serve against llama-server on the same checkpoint under concurrent clients, alternating, in one run.
#
#   benches/server.sh MODEL_DIR GGUF [ROUNDS] [CLIENT_COUNTS]
#
# MODEL_DIR: a model directory with its tokenizer (e.g. `q3c random-weights Qwen3-0.6B --dtype bf16
# --tokenizer ... -o DIR`), GGUF its conversion by llama.cpp's convert_hf_to_gguf.py. Needs $LLAMA_SERVER and
# a q3c built with --features llvm ($Q3C, default target/release/q3c). For each client count (a comma list,
# default 1,4,8,16) and round, it starts each server in turn with that many parallel slots, drives it with
# benches/server_load.py (that many clients, two streamed requests each; sampled with SAMPLE=1), and stops it.
set -euo pipefail
MODEL=$1 GGUF=$2 ROUNDS=${3:-2} COUNTS=${4:-1,4,8,16}
Q3C=${Q3C:-target/release/q3c}
THREADS=${THREADS:-2}
LOAD="$(dirname "$0")/server_load.py"
WORK=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT
"$Q3C" compile "$MODEL" -o "$WORK/model.so"
"$Q3C" probe --threads "$THREADS"
wait_for() { for _ in $(seq 120); do curl -sf "$1/health" >/dev/null && return; sleep 0.5; done; echo "no server at $1" >&2; exit 1; }
for clients in ${COUNTS//,/ }; do
  for round in $(seq "$ROUNDS"); do
    echo "== $clients clients, round $round"
    "$LLAMA_SERVER" -m "$GGUF" -np "$clients" -c $((1024 * clients)) -t "$THREADS" --port 8413 --jinja >/dev/null 2>&1 &
    PID=$!; wait_for http://127.0.0.1:8413
    python3 "$LOAD" http://127.0.0.1:8413 --clients "$clients" ${SAMPLE:+--sample} --label "llama-server -np $clients"
    kill "$PID"; wait "$PID" 2>/dev/null || true
    "$Q3C" serve "$WORK/model.so" --weights "$MODEL" --threads "$THREADS" --max-concurrent "$clients" --port 8414 2>/dev/null &
    PID=$!; wait_for http://127.0.0.1:8414
    python3 "$LOAD" http://127.0.0.1:8414 --clients "$clients" ${SAMPLE:+--sample} --label "q3c serve --max-concurrent $clients"
    kill "$PID"; wait "$PID" 2>/dev/null || true
    PID=
  done
done
