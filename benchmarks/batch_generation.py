"""One micro-batch of before/after rows: the transformers backend's generation vs one padded generate call.

What a batch of 8 users' before/after clicks costs the app: 8 DialogSum dialogues, each once for the
base model and once for the DialogSum adapter (16 rows, the app's 96-token cap, the task's stops),
through `backend.generate`. Variants, on one backend in one process, run interleaved (A, B, B, A, ...)
so drift on a shared CPU cancels:
  one-call   one padded `model.generate` over all rows (the backend before 2026-11-27): rows are
             prefilled padded to the longest prompt with the adapters mixed in one forward, and a
             finished row rides along until the last one is done
  grouped    prefill in groups of one system and similar length stacked into one KV cache
             (`prefill_group`), rows leave the batch as they finish (`leave_early`), and the adapter's
             update is masked off the base rows instead of peft routing rows by adapter_names in
             every LoRA layer (`mask_one_adapter`), decode appends to a KV cache buffered with room
             for the tokens to come instead of torch.cat copying it every step (`buffer_kv`), and an
             adapter's rows are prefilled on bf16 copies of its fp32 LoRA weights (`lora_prefill_bf16`):
             the default
  grouped-before   grouped without the last two (the default until 2026-11-27)
  grouped-cat / grouped-fp32-lora   grouped without the buffered cache / without the bf16 prefill
  grouped-by-1     grouped, each row prefilled alone (no padding, smaller products)
  grouped-routed   grouped, with peft's adapter_names routing (the default before the mask)
  grouped-only / leave-only   each of the first two halves alone (with the mask)
Prints seconds per batch (median), the grouped prefill's share of them, the ratio against one-call,
and how many outputs match one-call's (bf16 rounds differently for different batch shapes, so near-tie
tokens can flip; fp32 matches).
--clicks also times each dialogue alone as one before/after click (2 rows, the default variant) and
prints what batching can give at most: N clicks one at a time against the batch, and the ceiling if the
batch's decode cost no more than its slowest click's (its prefill costs what it costs: prefill is
arithmetic at the same price per token at any batch size on a CPU).
--rouge N then evaluates the first N DialogSum validation dialogues (base and adapter, batches of 16
rows, as `evaluate` does) with each of --rouge-variants (one-call and grouped by default): ROUGE-1/2/L
of each, and the time taken.

Usage:
  python benchmarks/batch_generation.py                    # embedded, 8 dialogues, 3 iterations, ~6 min
  python benchmarks/batch_generation.py --dialogues 4 --iterations 5
  python benchmarks/batch_generation.py --variants grouped --clicks   # + the batching ceiling, ~4 min more
  python benchmarks/batch_generation.py --iterations 1 --rouge 100   # + quality parity, ~10 min more
  python benchmarks/batch_generation.py --iterations 1 --rouge 200 --rouge-variants grouped,grouped-fp32-lora
  python benchmarks/batch_generation.py --profile tiny --dtype fp32 --quick   # seconds; outputs must match
  python benchmarks/batch_generation.py --random-base DIR --dialogues 1   # a GPU machine without the weights
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # _util and phisum, from any working directory
from _util import load_dialogues, load_line, make_standin_adapters, median, print_table, random_base_profile

FIELDS = ("prefill_group", "leave_early", "mask_one_adapter", "buffer_kv", "lora_prefill_bf16")
VARIANTS = {  # name -> the backend's settings, in FIELDS' order
    "one-call": (0, False, False, False, False),
    "grouped": (4, True, True, True, True),
    "grouped-before": (4, True, True, False, False),
    "grouped-cat": (4, True, True, False, True),
    "grouped-fp32-lora": (4, True, True, True, False),
    "grouped-by-1": (1, True, True, True, True),
    "grouped-routed": (4, True, False, True, True),
    "grouped-only": (4, False, True, True, True),
    "leave-only": (0, True, True, True, True),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded", help="embedded (default) or tiny")
    parser.add_argument("--dialogues", type=int, default=8, help="dialogues per batch (2 rows each)")
    parser.add_argument("--iterations", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: the profile's")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--rouge", type=int, default=0, metavar="N",
                        help="also score N DialogSum validation dialogues with each of --rouge-variants")
    parser.add_argument("--rouge-variants", default="one-call,grouped", help="comma-separated, for --rouge")
    parser.add_argument("--clicks", action="store_true", help="also time each dialogue alone as one click "
                        "and print the batching ceiling")
    parser.add_argument("--random-base", metavar="DIR", help="the profile's architecture with random weights, "
                        "from DIR's config.json and tokenizer files (timing only; rows run to the cap)")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 dialogues, 16 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.dialogues, args.max_new_tokens = 1, 2, 16
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if not names or any(n not in VARIANTS for n in names):
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}")
    rouge_names = [n.strip() for n in args.rouge_variants.split(",") if n.strip()]
    if args.rouge and (not rouge_names or any(n not in VARIANTS for n in rouge_names)):
        parser.error(f"--rouge-variants: choose from {', '.join(VARIANTS)}")
    names = ["one-call"] + [n for n in names if n != "one-call"]  # the baseline always runs

    import tempfile

    import torch

    from phisum import inference
    from phisum.backends.hf import TransformersBackend
    from phisum.generation import BASE, GenerationSettings
    from phisum.profiles import get_profile
    from phisum.tasks import TASKS

    profile = get_profile(args.profile)
    if args.random_base:
        profile = random_base_profile(profile, Path(args.random_base))
    adapter = {k: v for k, v in profile.adapter_sources().items() if k == "dialogsum" and Path(v).exists()}
    note = ""
    if not adapter:
        adapter = make_standin_adapters(profile, Path(tempfile.mkdtemp()), names=("dialogsum",))
        note = " (a stand-in adapter: the profile ships none)"
    backend = TransformersBackend.load(profile, adapter, dtype=args.dtype, progress=False)
    task = TASKS["dialogsum"]
    dialogues, source = load_dialogues(args.dialogues)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    prompts = [inference.fit_text(backend, task, d, settings.max_new_tokens)[0] for d in dialogues]
    rows, systems = prompts + prompts, [BASE] * len(prompts) + ["dialogsum"] * len(prompts)
    device = backend.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"{profile.name} ({backend.dtype} on {where}), {len(rows)} rows from {source}{note}; {load_line()}",
          flush=True)

    prefill_seconds = []
    grouped_prefill = backend._prefill

    def timed_prefill(*a, **k):  # the grouped prefill's share of a batch (one-call prefills inside generate)
        start = time.perf_counter()
        try:
            return grouped_prefill(*a, **k)
        finally:
            prefill_seconds.append(time.perf_counter() - start)

    backend._prefill = timed_prefill

    def run(name, batch=None):
        batch = batch or rows
        for field, value in zip(FIELDS, VARIANTS[name]):
            setattr(backend, field, value)
        prefill_seconds.clear()
        with backend.lock:
            start = time.perf_counter()
            outs = backend._generate_locked(batch, systems if batch is rows else [BASE, "dialogsum"],
                                            settings, task.stops)
        seconds = time.perf_counter() - start
        return seconds, sum(prefill_seconds), [o.text for o in outs], sum(o.new_tokens for o in outs)

    run("grouped")  # warm-up
    seconds, prefill, texts, tokens = {n: [] for n in names}, {n: [] for n in names}, {}, {}
    for r in range(args.iterations):
        for name in names if r % 2 == 0 else names[::-1]:
            s, p, texts[name], tokens[name] = run(name)
            seconds[name].append(s)
            prefill[name].append(p)
    base = median(seconds["one-call"])
    table = [[n, median(seconds[n]), base / median(seconds[n]), median(prefill[n]) if VARIANTS[n][0] else "-",
              tokens[n], f"{sum(a == b for a, b in zip(texts[n], texts['one-call']))}/{len(rows)}"] for n in names]
    print_table(f"One batch of {len(rows)} before/after rows, {args.max_new_tokens}-token cap (median of "
                f"{args.iterations} rounds)", ["variant", "s/batch", "x one-call", "prefill s", "tokens",
                                               "same text"], table)
    if args.clicks:
        ceiling(run, prompts, seconds["grouped"] if "grouped" in names else None, prefill.get("grouped"))
    if args.rouge:
        score(backend, args.rouge, task, rouge_names)
    print(f"after: {load_line()}")
    return 0


def ceiling(run, prompts, batch_seconds, batch_prefill) -> None:
    """Each dialogue as one click (median of 2) against the grouped batch of all of them.

    The batch decodes every step with at least the rows of any one click, for at least as many
    steps, so its decode costs at least its slowest click's. With its prefill as measured, that
    bounds how many times faster the batch can serve the clicks than one at a time."""
    clicks = []
    for prompt in prompts:
        runs = [run("grouped", [prompt, prompt]) for _ in range(2)]
        clicks.append((median([r[0] for r in runs]), median([r[1] for r in runs])))
    serial = sum(s for s, _ in clicks)
    slowest_decode = max(s - p for s, p in clicks)
    if batch_seconds is None:
        batch_seconds = [run("grouped")[:2] for _ in range(2)]
        batch_prefill, batch_seconds = [p for _, p in batch_seconds], [s for s, _ in batch_seconds]
    batch, prefill = median(batch_seconds), median(batch_prefill)
    print_table(f"{len(prompts)} clicks one at a time vs one batch (grouped)", ["", "seconds", "prefill s"],
                [["clicks one at a time", serial, sum(p for _, p in clicks)], ["one batch", batch, prefill],
                 ["batch, decode as fast as the slowest click", prefill + slowest_decode, prefill]])
    print(f"batching gives {serial / batch:.2f}x; its ceiling on this machine, whatever the decode: "
          f"{serial / (prefill + slowest_decode):.2f}x")


def score(backend, n: int, task, names) -> None:
    """`evaluation.evaluate` (ROUGE, max over references) with each variant's generation."""
    from phisum.data import load_dialogsum
    from phisum.evaluation import evaluate
    from phisum.generation import BASE, GenerationSettings

    folder = ROOT.parent / "shared" / "data" / "dialogsum"
    if not folder.exists():
        print(f"--rouge skipped: {folder} is absent (see ../shared/data/README.md)")
        return
    items = load_dialogsum(folder, "validation")[0][:n]
    rows, first = [], None
    for name in names:
        for field, value in zip(FIELDS, VARIANTS[name]):
            setattr(backend, field, value)
        report = evaluate(backend, items, [BASE, "dialogsum"], task, GenerationSettings(max_new_tokens=128),
                          batch_size=16)
        first = first or report
        rows += [[name, system, *(report.aggregate[system][m] for m in ("rouge1", "rouge2", "rougeL")),
                  f"{sum(a['outputs'][system] == b['outputs'][system] for a, b in zip(report.rows, first.rows))}"
                  f"/{len(items)}", report.seconds] for system in report.systems]
    print_table(f"ROUGE on the first {len(items)} validation dialogues (max over references; 128-token cap)",
                ["variant", "system", "ROUGE-1", "ROUGE-2", "ROUGE-L", f"same as {names[0]}",
                 "seconds (both systems)"], rows)

if __name__ == "__main__":
    sys.exit(main())
