"""Trained tokens/s and peak memory: trl SFTTrainer defaults vs phisum's CPU trainer and its variants.

Every variant trains the same LoRA (same init) on the same base, rows, batches and
steps, each in a FRESH process (so its peak RSS is its own and process-wide
settings such as the allocator do not leak into the next), one after the other,
so the RATIOS are meaningful on a shared CPU. Per-step losses are printed next to
each other: they must agree within bf16 noise (the variants change how the loss
is computed and when memory is freed, not what the loss is).

Variants:
  trl           trl's SFTTrainer with its defaults (activation checkpointing, full logits)
  one-backward  the trainer before this change: one backward per batch (all length groups'
                graphs alive at once), eager attention, glibc keeping freed memory (1 GB)
  phisum        the default: one forward+backward per length group (at most max_group_tokens
                padded tokens), eager attention, freed memory returned after every step
  phisum-sdpa   the same with torch's scaled_dot_product_attention (no score matrices kept)
  phisum-notrim the same as phisum without returning freed memory after each step
  phisum-keep   the same as phisum-notrim with glibc keeping freed memory (1 GB), as one-backward does

Usage:
  python benchmarks/train_throughput.py --rows recipe --data ../shared/data/dialogsum-full --steps 16 \
      --variants one-backward,phisum,phisum-keep     # the README's memory row (~10 min)
  python benchmarks/train_throughput.py                 # embedded Gemma 3 270M, the longest DialogSum rows
  python benchmarks/train_throughput.py --profile tiny  # seconds, for a smoke check
  python benchmarks/train_throughput.py --steps 4 --batch 8 --json out.json
  python benchmarks/train_throughput.py --variants one-backward,phisum   # a subset (trl is slow)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Ask glibc to keep freed blocks up to `limit` for reuse instead of returning them.

    What phisum's trainer did before per-group backward: with one backward per batch,
    each step freed and re-faulted gigabytes of blocks above glibc's mmap threshold, and
    keeping them mapped paid off. With per-group backward the blocks are small and the
    heap kept this way fragments (RSS grows step after step), so the trainer now leaves
    glibc at its defaults; the variants here show both. Process-wide; False off glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # glibc < 2.35 caps the mmap threshold at 32 MB on 64-bit: fall back to the cap.
    ok = bool(mallopt(m_mmap_threshold, limit) or mallopt(m_mmap_threshold, 32 << 20))
    return bool(mallopt(m_trim_threshold, 2**31 - 1)) and ok


VARIANTS = {  # name -> (label, fast trainer, trainer kwargs, attention, keep_freed_memory limit or None)
    "trl": ("trl SFTTrainer defaults", False, {}, None, None),
    "one-backward": ("one backward per batch (the old trainer)", True,
                     {"max_group_tokens": None, "release_memory": False}, "eager", 1 << 30),
    "phisum": ("phisum fast CPU path", True, {}, "eager", None),
    "phisum-sdpa": ("phisum, sdpa attention", True, {}, "sdpa", None),
    "phisum-notrim": ("phisum, no malloc_trim after steps", True, {"release_memory": False}, "eager", None),
    "phisum-keep": ("phisum, freed memory kept (1 GB)", True, {"release_memory": False}, "eager", 1 << 30),
}


class RSSCallback:
    """RSS after every step: whether memory levels off or keeps growing (fragmentation)."""

    def __new__(cls):
        from transformers import TrainerCallback

        from benchmarks._util import rss_mb

        class _RSS(TrainerCallback):
            def __init__(self):
                self.rss_mb = []

            def on_step_end(self, args, state, control, **kwargs):
                self.rss_mb.append(round(rss_mb()))

        return _RSS()


def run_variant(name: str, args) -> dict:
    """One variant in this (fresh) process."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    from benchmarks._util import peak_rss_mb
    from phisum.data import load_dialogsum
    from phisum.fast_trainer import CompletionOnlySFTTrainer, ThroughputCallback
    from phisum.models import load_base
    from phisum.profiles import PROFILES
    from phisum.tasks import TASKS

    _, fast, trainer_kwargs, attention, keep = VARIANTS[name]
    if args.threads:
        torch.set_num_threads(args.threads)
    if keep:
        keep_freed_memory(keep)
    profile = PROFILES[args.profile]
    model, tokenizer = load_base(profile, dtype=torch.float32, device="cpu", progress=False)
    train, _ = load_dialogsum(args.data, "train")
    rows = TASKS["dialogsum"].examples(train, tokenizer.eos_token)
    if args.rows == "longest":  # the batches that set a recipe's peak memory (length-grouped sampling runs them)
        rows.sort(key=lambda r: -len(r["prompt"]) - len(r["completion"]))
    # spare rows: trl drops those whose prompt fills max_length (many, with the tiny byte tokenizer);
    # "recipe" samples like the recipes do, from a larger pool
    rows = rows[: args.steps * args.batch * (12 if args.rows == "recipe" else 3)]
    if attention:
        model.set_attn_implementation(attention)
    torch.manual_seed(0)  # identical LoRA init in every variant
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=list(profile.lora_target_modules)))
    config = dict(output_dir=str(Path(args.workdir) / name), max_steps=args.steps, report_to="none",
                  per_device_train_batch_size=args.batch, learning_rate=2e-4, logging_steps=1, save_strategy="no",
                  use_cpu=True, bf16=True, max_length=768, disable_tqdm=True, seed=0,
                  train_sampling_strategy="group_by_length" if args.rows == "recipe" else "sequential")
    if fast:
        config["gradient_checkpointing"] = False  # everything else stays at trl's defaults
    meter = ThroughputCallback()
    memory = RSSCallback()
    extra = dict(trainer_kwargs) if fast else {}
    if fast and args.max_group_tokens and "max_group_tokens" not in extra:
        extra["max_group_tokens"] = args.max_group_tokens
    cls = CompletionOnlySFTTrainer if fast else SFTTrainer
    trainer = cls(model=model, args=SFTConfig(**config), train_dataset=Dataset.from_list(rows),
                  processing_class=tokenizer, callbacks=[meter, memory], **extra)
    batches = list(trainer.get_train_dataloader())[:args.steps]  # the sampler is seeded: the batches trained
    if len(batches) < args.steps:  # trl drops rows whose prompt fills max_length
        raise SystemExit(f"only {len(batches)} batches of {args.batch} fit max_length 768; "
                         f"lower --steps or --batch")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # The first step pays one-off costs (oneDNN kernel selection, allocator growth): timed apart.
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    seconds = sum(meter.step_seconds[1:])
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "first_step_seconds": meter.step_seconds[0], "losses": losses, "peak_rss_mb": peak_rss_mb(),
            "rss_mb_per_step": memory.rss_mb,
            "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded", choices=("embedded", "tiny"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "dialogsum"))
    parser.add_argument("--steps", type=int, default=4, help="the first one is a warm-up, not timed")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", choices=("longest", "first", "recipe"), default="longest",
                        help="longest: the longest training rows (peak memory); first: rows in file order; "
                             "recipe: length-grouped sampling from a pool of rows, as the recipes train")
    parser.add_argument("--max-group-tokens", type=int, default=None,
                        help="padded tokens per forward+backward for the per-group variants (default: the trainer's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per variant (default torch's)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, run in this order (default all: {','.join(VARIANTS)})")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is an untimed warm-up)")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        parser.error(f"unknown variant {unknown[0] if unknown else '(none)'}; choose from {', '.join(VARIANTS)}")
    if not Path(args.data).exists():
        print(f"DialogSum not found at {args.data} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    from benchmarks._util import RESULT_TAG, load_line

    if args.one:
        print(RESULT_TAG + json.dumps(run_variant(args.one, args)))
        return 0
    import subprocess
    import tempfile

    print(f"{args.profile}: {args.steps} steps of batch {args.batch} DialogSum rows ({args.rows}); {load_line()}",
          flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            command = [sys.executable, __file__, "--one", name, "--workdir", tmp, "--profile", args.profile,
                       "--data", args.data, "--steps", str(args.steps), "--batch", str(args.batch), "--rows", args.rows]
            if args.threads:
                command += ["--threads", str(args.threads)]
            if args.max_group_tokens:
                command += ["--max-group-tokens", str(args.max_group_tokens)]
            proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)), None)
            if line is None:
                print(f"variant {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            results[name] = json.loads(line[len(RESULT_TAG):])
    print(f"{'variant':<36}{'tokens/s':>10}{'seconds':>10}{'peak RSS MB':>13}{'last RSS MB':>13}   losses per step")
    for name, r in results.items():
        print(f"{VARIANTS[name][0]:<36}{r['tokens_per_second']:>10.1f}{r['seconds']:>10.1f}"
              f"{r['peak_rss_mb']:>13.0f}{r['rss_mb_per_step'][-1]:>13.0f}   "
              + " ".join(f"{x:.4f}" for x in r["losses"]))
    for name, r in results.items():
        print(f"RSS MB after each step, {name}: {r['rss_mb_per_step']}")
    print(load_line())
    base = results.get("phisum")
    for name, r in results.items():
        if name != "phisum" and base:
            print(f"phisum vs {name}: {base['tokens_per_second'] / r['tokens_per_second']:.2f}x tokens/s, "
                  f"{base['peak_rss_mb'] / r['peak_rss_mb']:.2f}x peak RSS")
    if len(results) > 1:
        first = next(iter(results.values()))
        gap = max(abs(a - b) for r in results.values() for a, b in zip(r["losses"], first["losses"]))
        print(f"largest per-step loss difference {gap:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"profile": args.profile, "steps": args.steps, "batch": args.batch,
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
