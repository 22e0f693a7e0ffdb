#!/usr/bin/env python3
"""How far quantized q3c artifacts' next-token distributions are from a reference artifact's, on a text,
measured as llama-perplexity's --kl-divergence measures them: the text's tokens cut into chunks of --ctx, the
second half of each chunk scored, KL(reference || quantized) per position.

  benches/kl.py --weights DIR --text FILE [--ctx 256] [--chunks 4] BASE.so OTHER.so [OTHER.so ...]

DIR holds the checkpoint and tokenizer.json (the artifacts run on it; a q8/q4 artifact quantizes it at load).
Needs numpy, safetensors and tokenizers (pip) and a q3c binary ($Q3C, default target/release/q3c). Prints, per
OTHER: mean KL, its 99th percentile, and how often the most likely token agrees with BASE's.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer


def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logits(q3c, so, weights, ids, tmp):
    out = os.path.join(tmp, "logits.safetensors")
    subprocess.run(
        [q3c, "logits", "--model", so, "--weights", weights, "--prompt-ids",
         ",".join(map(str, ids)), "--out", out],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return load_file(out)["logits"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("base")
    ap.add_argument("others", nargs="+")
    a = ap.parse_args()
    q3c = os.environ.get("Q3C", "target/release/q3c")
    tok = Tokenizer.from_file(os.path.join(a.weights, "tokenizer.json"))
    ids = tok.encode(open(a.text, encoding="utf-8").read(), add_special_tokens=False).ids
    if len(ids) < a.ctx * a.chunks:
        sys.exit(f"{a.text}: {len(ids)} tokens, need {a.ctx * a.chunks}")
    chunks = [ids[i * a.ctx:(i + 1) * a.ctx] for i in range(a.chunks)]
    first = a.ctx // 2
    with tempfile.TemporaryDirectory() as tmp:
        base = [log_softmax(logits(q3c, a.base, a.weights, c, tmp)[first:]) for c in chunks]
        for so in a.others:
            kl, agree = [], 0
            for c, lp in zip(chunks, base):
                lq = log_softmax(logits(q3c, so, a.weights, c, tmp)[first:])
                kl.extend((np.exp(lp) * (lp - lq)).sum(axis=-1))
                agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            kl = np.array(kl)
            print(f"{os.path.basename(so)}: mean KL {kl.mean():.6f}, 99% {np.percentile(kl, 99):.6f}, "
                  f"top-1 agreement {agree / len(kl):.4f} over {len(kl)} positions")


if __name__ == "__main__":
    main()
