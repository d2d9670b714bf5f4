"""Generation speed of the transformers backend on CPU: decode tokens/s, batching, time to first token.

Usage:
  python benchmarks/generation.py                      # embedded Gemma 3 270M, ~3 min
  python benchmarks/generation.py --iterations 5 --new-tokens 96
  python benchmarks/generation.py --threads 1          # when other jobs load the CPU
  python benchmarks/generation.py --profile tiny --quick

The variants are `TransformersBackend.load(profile, adapters={}, dtype=...,
fast_cpu=...)`: the CPU fast path (prepacked oneDNN bf16 linears + fused Gemma
RMSNorm) against plain bf16, and bf16 against fp32. Every comparison loads its
variants side by side and runs them interleaved (A, B, A, B, ...) so drift from
other work on the shared CPU cancels; the table shows medians and the ratio.
Decode rate = batch * (N - 1) / (t(N) - t(1)): prefill is subtracted by also
timing a 1-token run. Those runs call `backend.model.generate` under
`backend.lock` with `eos_token_id=-1`, so every row generates exactly N tokens
(the backend contract has no EOS override, and min_new_tokens would add
logits-processing time). The first streamed text comes from `backend.stream`.
The "app path" table goes through what the app calls, `inference.summarize`
(which fits the DialogSum prompts and calls `backend.generate` with the task's
stops), and counts the tokens actually generated.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # _util and phisum, from any working directory
from _util import Timer, load_dialogues, load_line, median, print_table, verdict

GOAL_DECODE = 30.0  # batch-1 bf16 tokens/s
GOAL_BATCH8 = 6.0  # batch-8 throughput over batch-1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded", help="embedded (default), phi2 or tiny")
    parser.add_argument("--iterations", type=int, default=3, help="interleaved rounds per comparison")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timed run")
    parser.add_argument("--batches", default="1,4,8", help="batch sizes for the throughput table")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's choice). On a CPU other jobs are using, 1 thread "
                             "can be several times faster: 2 threads wait on each other at every small op")
    parser.add_argument("--quick", action="store_true", help="1 round, 8 tokens: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.new_tokens = 1, 8
    batches = sorted({int(b) for b in args.batches.split(",")} | {1})

    import torch
    import transformers
    from tqdm.auto import tqdm

    from phisum import inference
    from phisum.backends.hf import TransformersBackend
    from phisum.generation import BASE, GenerationSettings
    from phisum.profiles import get_profile
    from phisum.tasks import TASKS

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # eos_token_id=-1 is deliberate (see docstring)
    print(f"profile {args.profile}, torch {torch.__version__}, {torch.get_num_threads()} threads; {load_line()}")
    profile = get_profile(args.profile)
    task = TASKS["dialogsum"]
    backends = {
        "bf16 fast": TransformersBackend.load(profile, adapters={}, dtype="bf16", fast_cpu=True, progress=False),
        "bf16 plain": TransformersBackend.load(profile, adapters={}, dtype="bf16", fast_cpu=False, progress=False),
        "fp32": TransformersBackend.load(profile, adapters={}, dtype="fp32", fast_cpu=True, progress=False),
    }
    print(f"packed layers in 'bf16 fast': {backends['bf16 fast'].packed_layers}")
    dialogues, source = load_dialogues(max(batches + [8]))
    prompts = [task.prompt(d) for d in dialogues]
    print(f"prompts: DialogSum prompt on dialogues from {source}")

    def run(backend, batch, new_tokens):
        enc = backend.encode(prompts[:batch])
        with backend.lock, torch.inference_mode(), Timer() as timer:
            out = backend.model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                                         pad_token_id=backend.tokenizer.pad_token_id,
                                         temperature=None, top_p=None, top_k=None)
        return timer.seconds, out[:, enc["input_ids"].shape[1]:]

    def decode_rates(cases, rounds):
        """cases: {label: (backend, batch)} -> ({label: [tok/s]}, {label: [prefill s]}, {label: last ids})."""
        rates, prefill, ids = {k: [] for k in cases}, {k: [] for k in cases}, {}
        n = args.new_tokens
        for _ in tqdm(range(rounds), desc="rounds", leave=False):
            for label, (backend, batch) in cases.items():
                first, _ = run(backend, batch, 1)
                full, ids[label] = run(backend, batch, n)
                prefill[label].append(first)
                rates[label].append(batch * (n - 1) / max(full - first, 1e-9))
        return rates, prefill, ids

    for backend in backends.values():  # warm-up: first calls allocate and pick kernels
        run(backend, 1, 2)

    rounds = args.iterations
    rates, prefill, ids = decode_rates({k: (b, 1) for k, b in backends.items()}, rounds)
    med = {k: median(v) for k, v in rates.items()}
    same = torch.equal(ids["bf16 fast"], ids["bf16 plain"])
    rows = [
        ["fast CPU path vs plain bf16", f"{med['bf16 plain']:.1f}", f"{med['bf16 fast']:.1f}",
         med["bf16 fast"] / med["bf16 plain"], f"tokens identical: {same}", verdict(same)],
        ["bf16 (fast) vs fp32", f"{med['fp32']:.1f}", f"{med['bf16 fast']:.1f}",
         med["bf16 fast"] / med["fp32"], f">= {GOAL_DECODE:.0f} tok/s",
         verdict(med["bf16 fast"] >= GOAL_DECODE, absolute=True)],
    ]
    print_table(f"Batch-1 decode tokens/s (median of {rounds}, {args.new_tokens} new tokens, prefill excluded)",
                ["comparison", "A tok/s", "B tok/s", "B/A", "goal", "verdict"], rows)

    fast = backends["bf16 fast"]
    rates, prefill, _ = decode_rates({b: (fast, b) for b in batches}, rounds)
    base = median(rates[1])
    rows = [[b, median(rates[b]), median(rates[b]) / base, median(prefill[b])] for b in batches]
    print_table(f"Batched decode, bf16 fast (total tokens/s; goal batch-8 >= {GOAL_BATCH8:.0f}x batch-1: "
                f"{verdict(8 in rates and median(rates[8]) / base >= GOAL_BATCH8)})",
                ["batch", "tok/s total", "x batch-1", "prefill s"], rows)

    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    ttft, stream_first = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        stream = fast.stream(prompts[0], BASE, settings, task.stops)
        for piece in stream:
            if piece:
                break
        stream_first.append(time.perf_counter() - t0)
        stream.close()
        ttft.append(run(fast, 1, 1)[0])
    print_table("Time to first token, batch 1, bf16 fast (median seconds)", ["measure", "seconds"],
                [["prefill + 1 token (model.generate)", median(ttft)],
                 ["first visible text (backend.stream)", median(stream_first)]])

    app = {1: [], 8: []}
    for _ in range(rounds):
        for batch, rates_b in app.items():
            with Timer() as timer:
                outs = inference.summarize(fast, dialogues[:8], BASE, settings, task, batch_size=batch)
            rates_b.append(sum(o.new_tokens for o in outs) / timer.seconds)
    print_table("App path: inference.summarize -> backend.generate on 8 dialogues, stops at EOS or the task's "
                "stop (generated tokens/s, median)",
                ["batch_size", "tok/s", "x batch-1"],
                [[b, median(v), median(v) / median(app[1])] for b, v in app.items()])
    print(f"\nafter: {load_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
