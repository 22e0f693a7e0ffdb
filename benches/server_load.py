#!/usr/bin/env python3
"""Concurrent chat clients against an OpenAI-compatible server (q3c serve, llama-server), standard library only.

    benches/server_load.py URL [--clients 4] [--requests 2] [--max-tokens 64] [--sample] [--label NAME]

Each of CLIENTS threads sends REQUESTS streamed chat completions one after another (greedy, or with --sample
seeded samples through llama-server's default sampler chain, given explicitly to both: thinking off,
a ~110-token prompt that differs per client and request so that no prompt cache helps, `ignore_eos` so that
every answer runs to MAX_TOKENS, `stream_options.include_usage` for the token count). After one untimed
request, it prints: completion tokens of all clients per second of wall time (aggregate), request latency
(p50, p99), and — where the stream's text arrives token by token — time to first text and the time between
text chunks (p50, p99). A model with random weights mostly writes byte tokens that are not whole UTF-8
characters, which both servers hold back until they are, so for such a checkpoint only the first two mean
anything; sampled (--sample), such a model writes mostly whole tokens of text, so the text arrives token by
token and the first-text and inter-token figures mean something too. Run it against both servers on the same
checkpoint, alternating, and compare.
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


def stream(url: str, body: dict) -> tuple[float, float, list[float], int]:
    """Sends one streamed request; returns (latency, time to first text, gaps between text chunks, tokens)."""
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            delta = choices[0].get("delta", {}) if choices else {}
            if delta.get("content") or delta.get("reasoning_content"):
                now = time.perf_counter()
                if first is None:
                    first = now - t0
                else:
                    gaps.append(now - last)
                last = now
    total = time.perf_counter() - t0
    return total, (first if first is not None else total), gaps, tokens


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--sample", action="store_true")
    ap.add_argument("--label", default="server")
    args = ap.parse_args()
    latencies: list[float] = []
    ttfts: list[float] = []
    gaps: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def body(c: int, n: int) -> dict:
        sampling = (
            # llama-server's defaults, spelled out so that both servers sample the same way.
            {"temperature": 1.0, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "seed": 1000 * c + n}
            if args.sample
            else {"temperature": 0}
        )
        return {
            "model": "m",
            "messages": [{"role": "user", "content": prompt(c, n)}],
            "max_tokens": args.max_tokens,
            **sampling,
            "stream": True,
            "stream_options": {"include_usage": True},
            "chat_template_kwargs": {"enable_thinking": False},
            # Run to max_tokens on both servers (random weights rarely stop, but never early).
            "ignore_eos": True,
        }

    def client(c: int) -> None:
        for n in range(args.requests):
            try:
                latency, ttft, g, t = stream(args.url, body(c, n))
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(e))
                return
            with lock:
                latencies.append(latency)
                ttfts.append(ttft)
                gaps.extend(g)
                tokens[0] += t

    # One untimed request first: the server's first pass faults in its weights and grows its caches.
    stream(args.url, body(args.clients, 99))
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} requests failed: {errors[0]}")
    print(
        f"{args.label}: {args.clients} clients x {args.requests} requests: {tokens[0] / wall:.2f} tok/s aggregate; "
        f"latency p50 {percentile(latencies, 50):.2f} s, p99 {percentile(latencies, 99):.2f} s; "
        f"first text p50 {percentile(ttfts, 50):.3f} s, p99 {percentile(ttfts, 99):.3f} s; "
        f"inter-token p50 {1000 * percentile(gaps, 50):.1f} ms, p99 {1000 * percentile(gaps, 99):.1f} ms"
    )


if __name__ == "__main__":
    main()
