"""The LM head's loss: whole-vocabulary logits (autocast, as before) vs phisum.head_loss's chunks.

Each variant runs in a FRESH process on the same random head, hidden states and
targets: forward + backward of the summed cross-entropy of N completion tokens
through a frozen head, as one group of a CPU training step does. Prints the peak
memory above the start (the block a training step must hold for the head), the
seconds, and that the loss and the hidden-state gradient agree.

Usage:
  python benchmarks/head_loss.py                       # Gemma's head: 262,144 x 640, 150 and 400 tokens
  python benchmarks/head_loss.py --tokens 64,256,512 --iterations 3
  python benchmarks/head_loss.py --profile tiny        # a small head, seconds (smoke check)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HEADS = {"embedded": (262144, 640), "tiny": (4096, 64)}  # (vocabulary, hidden): Gemma 3 270M, a toy


def run_one(variant: str, vocab: int, hidden: int, tokens: int) -> dict:
    import time

    import torch
    import torch.nn.functional as F

    from benchmarks._util import rss_mb
    from phisum.head_loss import chunked_head_loss

    torch.manual_seed(0)
    weight = torch.randn(vocab, hidden) * 0.02  # fp32, tied to the embedding as in Gemma
    head = weight.to(torch.bfloat16)  # the trainer's copy, made once
    states = torch.randn(tokens, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    with open("/proc/self/clear_refs", "w") as f:  # restart the high-water mark here
        f.write("5")
    start = rss_mb()
    t = time.perf_counter()
    if variant == "whole":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = F.linear(states, weight)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    else:
        loss = chunked_head_loss(states, head, targets)
    loss.backward()
    seconds = time.perf_counter() - t
    peak = int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1]) / 1024
    return {"peak_above_start_mb": peak - start, "seconds": seconds, "loss": float(loss.detach()),
            "grad_sum": float(states.grad.abs().sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded", choices=tuple(HEADS))
    parser.add_argument("--tokens", default="150,400", help="completion tokens in one group, comma-separated")
    parser.add_argument("--iterations", type=int, default=2, help="fresh processes per variant and size (median)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    vocab, hidden = HEADS[args.profile]
    from benchmarks._util import RESULT_TAG, load_line

    if args.one:
        variant, tokens = args.one.split(":")
        print(RESULT_TAG + json.dumps(run_one(variant, vocab, hidden, int(tokens))))
        return 0
    print(f"head {vocab} x {hidden}; {load_line()}")
    for tokens in (int(x) for x in args.tokens.split(",")):
        results = {}
        for _ in range(args.iterations):
            for variant in ("whole", "chunked"):
                proc = subprocess.run([sys.executable, __file__, "--profile", args.profile, "--one",
                                       f"{variant}:{tokens}"], capture_output=True, text=True, cwd=ROOT)
                line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)), None)
                if line is None:
                    print(f"{variant} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    return 1
                results.setdefault(variant, []).append(json.loads(line[len(RESULT_TAG):]))
        med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in results.items()}
        w, c = med["whole"], med["chunked"]
        same = abs(w["loss"] - c["loss"]) <= 1e-4 * abs(w["loss"]) and abs(w["grad_sum"] - c["grad_sum"]) <= 1e-3 * w["grad_sum"]
        print(f"{tokens:>5} tokens: whole {w['peak_above_start_mb']:.0f} MB {w['seconds']:.2f} s | chunked "
              f"{c['peak_above_start_mb']:.0f} MB {c['seconds']:.2f} s | memory {c['peak_above_start_mb'] / w['peak_above_start_mb']:.2f}x, "
              f"time {c['seconds'] / w['seconds']:.2f}x, same loss and gradient: {same}")
    print(load_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
