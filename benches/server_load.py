#!/usr/bin/env python3
"""Concurrent chat clients against an OpenAI-compatible server (q3c serve, llama-server), standard library only.

    benches/server_load.py URL [--clients 4] [--requests 2] [--max-tokens 64] [--label NAME]

Each of CLIENTS threads sends REQUESTS chat completions one after another (non-streaming, greedy, thinking
off, a ~110-token prompt that differs per client so that no prompt cache helps), and the script prints the
aggregate completion tokens per second over the wall time of the whole run (after one untimed request), the mean per-request latency
and the mean completion tokens per request (from each response's `usage`). Run it against both servers on
the same checkpoint, alternating, and compare the aggregate rates.
"""

import argparse
import json
import threading
import time
import urllib.request

TOPICS = ["rivers", "mountains", "the sea", "deserts", "forests", "cities", "islands", "volcanoes"]


def prompt(client: int, n: int) -> str:
    topic = TOPICS[(client + n) % len(TOPICS)]
    return (
        f"Client {client}, request {n}. Please write a short, plain description of {topic} for a child who "
        "has never seen them, in a calm and friendly tone. Use simple words, short sentences and one "
        "example the child could imagine. Avoid lists and headings; write it as a single paragraph. "
        "Mention what they look like, what sounds you might hear there, what the air feels like, and "
        "one animal that lives there. Keep the whole answer under one hundred words, and end with a "
        "question the child could think about afterwards."
    )


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--label", default="server")
    args = ap.parse_args()
    results: list[tuple[float, int]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def body(c: int, n: int) -> dict:
        return {
            "model": "m",
            "messages": [{"role": "user", "content": prompt(c, n)}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": False},
            # Run to max_tokens on both servers (random weights rarely stop, but never early).
            "ignore_eos": True,
        }

    def client(c: int) -> None:
        for n in range(args.requests):
            t0 = time.perf_counter()
            try:
                r = post(args.url, body(c, n))
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(e))
                return
            with lock:
                results.append((time.perf_counter() - t0, r["usage"]["completion_tokens"]))

    # One untimed request first: the server's first pass faults in its weights and grows its caches.
    post(args.url, body(args.clients, 0))
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} requests failed: {errors[0]}")
    tokens = sum(n for _, n in results)
    print(
        f"{args.label}: {args.clients} clients x {args.requests} requests: {tokens / wall:.2f} tok/s aggregate, "
        f"mean latency {sum(t for t, _ in results) / len(results):.2f} s, "
        f"{tokens / len(results):.1f} completion tokens per request"
    )


if __name__ == "__main__":
    main()
