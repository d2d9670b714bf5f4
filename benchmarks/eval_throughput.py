"""Evaluation throughput: batched base+adapter generation vs a one-at-a-time loop.

The published notebooks summarise each test dialogue alone, first with the base
model, then with the adapter. The evaluator (phisum.evaluation.generate_outputs,
what `evaluate` runs) sorts items by length and hands base and adapter rows of the
same dialogues to one backend.generate call (inference.compare; on the transformers
backend one batch through peft adapter_names). The loop calls inference.summarize
on one dialogue at a time with batch_size=1. Both variants run here side by side
on one backend in one process on the same DialogSum test items, alternating group
by group (one batch's worth of items each); the script prints summaries per
minute, the ratio, and how many outputs are identical (greedy decoding should give
the same text either way; bf16 rounds differently for different batch shapes, so
near-tie tokens can flip, while fp32 should match exactly).

Usage:
  python benchmarks/eval_throughput.py                       # embedded, transformers, 32 items, bf16
  python benchmarks/eval_throughput.py --dtype fp32 --n 16   # check output identity in fp32
  python benchmarks/eval_throughput.py --adapter PATH        # another adapter folder
  python benchmarks/eval_throughput.py --backend llamacpp    # the same comparison on llama.cpp
  python benchmarks/eval_throughput.py --profile tiny --quick
If assets/adapters/<profile>/dialogsum is absent, a stand-in LoRA adapter (random B)
is built in a temporary folder and the script says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # _util and phisum, from any working directory
from _util import load_line, make_standin_adapters


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded", help="embedded (default), phi2 or tiny")
    parser.add_argument("--backend", default="transformers", choices=("transformers", "llamacpp"),
                        help="transformers (default) or llamacpp")
    parser.add_argument("--n", type=int, default=32, help="DialogSum test items (default 32)")
    parser.add_argument("--batch-size", type=int, default=16, help="generate rows per batched call")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="transformers backend only (default: the profile's, bf16 for embedded)")
    parser.add_argument("--adapter", default=None, help="dialogsum adapter folder "
                        "(default assets/adapters/<profile>/dialogsum, else a stand-in)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default torch's; llama.cpp's 2); 1 is far steadier on an "
                             "oversubscribed CPU")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/dialogsum"))
    parser.add_argument("--quick", action="store_true", help="4 items, 8 new tokens, batch 4: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.max_new_tokens, args.batch_size = 4, 8, 4

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; peft would otherwise probe the Hub
    import torch
    from tqdm.auto import tqdm

    from phisum import inference
    from phisum.backends import load_backend
    from phisum.data import load_dialogsum
    from phisum.evaluation import generate_outputs
    from phisum.generation import BASE, GenerationSettings
    from phisum.profiles import get_profile

    profile = get_profile(args.profile)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, report = load_dialogsum(args.data, "test")
    dialogues = [r["dialogue"] for r in rows[:args.n]]
    adapter = Path(args.adapter or ROOT / "assets" / "adapters" / profile.name / "dialogsum")
    tmp = None
    if not (adapter / "adapter_model.safetensors").exists():
        tmp = tempfile.TemporaryDirectory()
        print(f"{adapter} not found: using a stand-in LoRA adapter (small random B, r=16) in {tmp.name}")
        adapter = make_standin_adapters(profile, Path(tmp.name), names=("dialogsum",))["dialogsum"]
    backend = load_backend(profile.name, args.backend, adapters={"dialogsum": str(adapter)}, threads=args.threads,
                           batch_size=args.batch_size, dtype=args.dtype)
    if backend.missing:
        raise SystemExit(f"adapter not loaded: {backend.missing}")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    dialogues.sort(key=backend.count_tokens)  # as the evaluator does before batching: less padding
    systems = [BASE, "dialogsum"]
    inference.summarize(backend, dialogues[:1], BASE, GenerationSettings(max_new_tokens=4))  # warm-up, not timed
    dtype = backend.describe().get("dtype", "its own dtype")
    print(f"{profile.base_model} on {backend.name}, {dtype}, {torch.get_num_threads()} torch threads, "
          f"{len(dialogues)} items x {len(systems)} systems, "
          f"max_new_tokens={args.max_new_tokens}, data {report.source}; {load_line()}")

    # The CPU is shared: alternate the two variants group by group so load changes hit both alike.
    step = max(1, args.batch_size // 2)
    batched, single = {s: [] for s in systems}, {s: [] for s in systems}
    t_batched = t_single = 0.0
    bar = tqdm(total=4 * len(dialogues), desc="summaries (both variants)", unit="summary")
    for start in range(0, len(dialogues), step):
        group = dialogues[start:start + step]
        t0 = time.perf_counter()
        outs = generate_outputs(backend, group, systems, settings, batch_size=args.batch_size)
        t_batched += time.perf_counter() - t0
        bar.update(2 * len(group))
        t0 = time.perf_counter()
        for system in systems:  # what the notebooks do: base over the items, then the adapter
            for d in group:
                single[system].append(inference.summarize(backend, [d], system, settings, batch_size=1)[0])
                bar.update()
        t_single += time.perf_counter() - t0
        bar.write(f"items {start}-{start + len(group) - 1}: one at a time {t_single:.0f} s, batched {t_batched:.0f} s "
                  f"so far ({t_single / t_batched:.2f}x)")
        for s in systems:
            batched[s].extend(outs[s])
    bar.close()

    total = 2 * len(dialogues)
    print(f"one at a time: {t_single:7.1f} s  {60 * total / t_single:6.1f} summaries/min")
    print(f"batched ({args.batch_size} rows): {t_batched:7.1f} s  {60 * total / t_batched:6.1f} summaries/min")
    print(f"speed-up: {t_single / t_batched:.2f}x")
    for s in systems:
        same = sum(a.text == b.text for a, b in zip(batched[s], single[s]))
        cut = sum(g.finish_reason == "length" for g in single[s])
        tokens = sum(g.new_tokens for g in single[s])
        print(f"{s}: {same} of {len(dialogues)} outputs identical; {cut} cut at max_new_tokens; "
              f"{tokens} new tokens one at a time")
        for i, (a, b) in enumerate(zip(batched[s], single[s])):
            if a.text != b.text:
                k = next((j for j, (x, y) in enumerate(zip(a.text, b.text)) if x != y), min(len(a.text), len(b.text)))
                print(f"  item {i}: differ from char {k} of {len(b.text)}: batched {a.text[k:k + 40]!r} "
                      f"vs single {b.text[k:k + 40]!r}")
    print(f"after: {load_line()}")
    backend.close()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
