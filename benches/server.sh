#!/usr/bin/env bash
# q3c serve against llama-server on the same checkpoint under concurrent clients, alternating, in one run.
#
#   benches/server.sh MODEL_DIR GGUF [ROUNDS] [CLIENTS]
#
# MODEL_DIR: a model directory with its tokenizer (e.g. `q3c random-weights Qwen3-0.6B --dtype bf16
# --tokenizer ... -o DIR`), GGUF its conversion by llama.cpp's convert_hf_to_gguf.py. Needs $LLAMA_SERVER and
# a q3c built with --features llvm ($Q3C, default target/release/q3c). Each round starts each server with
# CLIENTS parallel slots (default 4), runs benches/server_load.py with CLIENTS clients and with one, and stops
# it.
set -euo pipefail
MODEL=$1 GGUF=$2 ROUNDS=${3:-2} CLIENTS=${4:-4}
Q3C=${Q3C:-target/release/q3c}
THREADS=${THREADS:-2}
LOAD="$(dirname "$0")/server_load.py"
WORK=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT
"$Q3C" compile "$MODEL" -o "$WORK/model.so"
"$Q3C" probe --threads "$THREADS"
wait_for() { for _ in $(seq 120); do curl -sf "$1/health" >/dev/null && return; sleep 0.5; done; echo "no server at $1" >&2; exit 1; }
for round in $(seq "$ROUNDS"); do
  echo "== round $round"
  "$LLAMA_SERVER" -m "$GGUF" -np "$CLIENTS" -c $((2048 * CLIENTS)) -t "$THREADS" --port 8413 --jinja >/dev/null 2>&1 &
  PID=$!; wait_for http://127.0.0.1:8413
  python3 "$LOAD" http://127.0.0.1:8413 --clients "$CLIENTS" --label "llama-server -np $CLIENTS"
  python3 "$LOAD" http://127.0.0.1:8413 --clients 1 --label "llama-server, one client"
  kill "$PID"; wait "$PID" 2>/dev/null || true
  "$Q3C" serve "$WORK/model.so" --weights "$MODEL" --threads "$THREADS" --max-concurrent "$CLIENTS" --port 8414 >/dev/null &
  PID=$!; wait_for http://127.0.0.1:8414
  python3 "$LOAD" http://127.0.0.1:8414 --clients "$CLIENTS" --label "q3c serve --max-concurrent $CLIENTS"
  python3 "$LOAD" http://127.0.0.1:8414 --clients 1 --label "q3c serve, one client"
  kill "$PID"; wait "$PID" 2>/dev/null || true
  PID=
done
