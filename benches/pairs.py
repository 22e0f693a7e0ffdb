#!/usr/bin/env python3
"""Decode speed of several models in tightly alternating runs, with the median ratio of each to the first.

    benches/pairs.py WEIGHTS ROUNDS MODEL MODEL... -- [q3c bench arguments]

This machine's memory bandwidth moves by the minute (38 to 79 GB/s within an hour), more than most changes
worth measuring, so a figure is only compared with one taken seconds before or after it. Each round runs every
MODEL once (the order rotated and reversed from round to round) and the ratios are taken within the round.
A MODEL is a compiled q3c artifact (run with `q3c bench --model MODEL --weights WEIGHTS` and the arguments
after `--`; `ARTIFACT@DIR` runs it on the weights in DIR instead, e.g. a checkpoint pre-quantized for it by
the same build), or `llama:GGUF` (run with `llama-bench -m GGUF -t THREADS -p 0 -n GEN -r 1`, GEN the `--gen`
given to q3c, so both decode the same number of tokens). `$Q3C` is the q3c binary (default
target/release/q3c), `$LLAMA_BENCH` llama.cpp's llama-bench, `$THREADS` the threads for both (default 2).
Prints each round's tokens per second (the aggregate with `--batch`) and, per model, the median, smallest and
largest ratio to the first model.
"""

import os
import re
import statistics
import subprocess
import sys

Q3C = os.environ.get("Q3C", "target/release/q3c")
LLAMA_BENCH = os.environ.get("LLAMA_BENCH", "llama-bench")
THREADS = os.environ.get("THREADS", "2")


def run(model: str, weights: str, extra: list[str]) -> float:
    """One decode figure (tokens per second) of `model`."""
    if model.startswith("llama:"):
        gen = extra[extra.index("--gen") + 1] if "--gen" in extra else "64"
        cmd = [LLAMA_BENCH, "-m", model[6:], "-t", THREADS, "-p", "0", "-n", gen, "-r", "1", "-o", "csv"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        header, row = out.strip().splitlines()[0], out.strip().splitlines()[-1]
        fields = dict(zip(header.split(","), row.split(",")))
        return float(fields["avg_ts"].strip('"'))
    if "@" in model:
        model, weights = model.split("@", 1)
    cmd = [Q3C, "bench", "--model", model, "--weights", weights, "--threads", THREADS, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    found = re.search(r"tg\d+ ([0-9.]+) tok/s aggregate", out) or re.search(r"^tg\d+: ([0-9.]+)", out, re.M)
    if not found:
        sys.exit(f"pairs.py: no decode figure in the output of {' '.join(cmd)}:\n{out}")
    return float(found.group(1))


def main() -> None:
    args = sys.argv[1:]
    if "--" not in args or len(args[: args.index("--")]) < 4:
        sys.exit(__doc__)
    sep = args.index("--")
    weights, rounds, models, extra = args[0], int(args[1]), args[2:sep], args[sep + 1 :]
    figures: dict[str, list[float]] = {m: [] for m in models}
    for i in range(rounds):
        order = models[i % len(models) :] + models[: i % len(models)]
        for m in order[::-1] if i % 2 else order:
            figures[m].append(run(m, weights, extra))
        print(f"round {i + 1}: " + ", ".join(f"{m} {figures[m][-1]:.1f}" for m in models), flush=True)
    first = models[0]
    for m in models[1:]:
        ratios = [b / a for a, b in zip(figures[first], figures[m])]
        print(
            f"{m} / {first}: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f});"
            f" tok/s medians {statistics.median(figures[first]):.1f} -> {statistics.median(figures[m]):.1f}"
        )


if __name__ == "__main__":
    main()
