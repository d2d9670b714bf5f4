"""Trained tokens/s: trl SFTTrainer defaults vs phisum's completion-only CPU trainer.

Both variants train the same LoRA (same init) on the same base, rows, batches and
steps, side by side in one process, so the RATIO is meaningful on a shared CPU.
The per-step losses are printed next to each other: they must agree within bf16
noise (the fast path changes how the loss is computed, not what it is).

The fast variant includes what `phisum train` does on a CPU before training,
`keep_freed_memory()` (glibc keeps freed blocks instead of unmapping them). That
setting is process-wide and cannot be undone, so trl's defaults run first; with
--tuned-baseline a third run times trl's defaults again after the setting, to show
how much of the speed-up is the allocator and how much the trainer.

Usage:
  python benchmarks/train_throughput.py                 # embedded Gemma 3 270M, real DialogSum rows
  python benchmarks/train_throughput.py --profile tiny  # seconds, for a smoke check
  python benchmarks/train_throughput.py --steps 4 --batch 8 --json out.json
  python benchmarks/train_throughput.py --tuned-baseline   # + trl defaults with the allocator setting
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_variant(fast: bool, profile, rows, args, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    from phisum.fast_trainer import CompletionOnlySFTTrainer, ThroughputCallback, keep_freed_memory
    from phisum.models import load_base

    if fast:
        keep_freed_memory()  # what phisum.training.choose_fast_path does on CPU
    model, tokenizer = load_base(profile, dtype=torch.float32, device="cpu", progress=False)
    if fast:
        model.set_attn_implementation("eager")  # what phisum.training.choose_fast_path picks on CPU
    torch.manual_seed(0)  # identical LoRA init in both variants
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=list(profile.lora_target_modules)))
    config = dict(output_dir=str(workdir / ("fast" if fast else "trl")), max_steps=args.steps, report_to="none",
                  per_device_train_batch_size=args.batch, learning_rate=2e-4, logging_steps=1, save_strategy="no",
                  use_cpu=True, bf16=True, max_length=768, train_sampling_strategy="sequential",
                  disable_tqdm=True, seed=0)
    if fast:
        config["gradient_checkpointing"] = False  # everything else stays at trl's defaults
    meter = ThroughputCallback()
    cls = CompletionOnlySFTTrainer if fast else SFTTrainer
    trainer = cls(model=model, args=SFTConfig(**config), train_dataset=Dataset.from_list(rows),
                  processing_class=tokenizer, callbacks=[meter])
    batches = list(trainer.get_train_dataloader())[:args.steps]
    if len(batches) < args.steps:  # trl drops rows whose prompt fills max_length
        raise SystemExit(f"only {len(batches)} batches of {args.batch} fit max_length 768; "
                         f"lower --steps or --batch")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # The first step pays one-off costs (oneDNN kernel selection, allocator growth): timed apart.
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    seconds = sum(meter.step_seconds[1:])
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "first_step_seconds": meter.step_seconds[0], "losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded", choices=("embedded", "tiny"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "dialogsum"))
    parser.add_argument("--steps", type=int, default=4, help="the first one is a warm-up, not timed")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--tuned-baseline", action="store_true",
                        help="also time trl's defaults after the fast path's allocator setting")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is an untimed warm-up)")
    import tempfile

    from phisum.data import dialogsum_examples, load_dialogsum
    from phisum.models import load_base
    from phisum.profiles import PROFILES

    profile = PROFILES[args.profile]
    if not Path(args.data).exists():
        print(f"DialogSum not found at {args.data} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    _, tokenizer = load_base(profile, device="cpu", progress=False)
    train, report = load_dialogsum(args.data, "train")
    # spare rows: trl drops those whose prompt fills max_length (many, with the tiny byte tokenizer)
    rows = dialogsum_examples(train[: args.steps * args.batch * 3], tokenizer.eos_token)
    print(f"{profile.base_model}: {report.summary()}; {args.steps} steps of batch {args.batch}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        slow = run_variant(False, profile, rows, args, Path(tmp))  # first: before the allocator setting
        fast = run_variant(True, profile, rows, args, Path(tmp))
        tuned = run_variant(False, profile, rows, args, Path(tmp)) if args.tuned_baseline else None
    print(f"{'variant':<36}{'tokens/s':>10}{'seconds':>10}   losses per step")
    named = [("trl SFTTrainer defaults", slow), ("phisum fast CPU path", fast)]
    if tuned:
        named.append(("trl defaults + keep_freed_memory", tuned))
    for name, r in named:
        print(f"{name:<36}{r['tokens_per_second']:>10.1f}{r['seconds']:>10.1f}   "
              + " ".join(f"{x:.4f}" for x in r["losses"]))
    ratio = fast["tokens_per_second"] / slow["tokens_per_second"]
    gap = max(abs(a - b) for a, b in zip(fast["losses"], slow["losses"]))
    print(f"speed-up: {ratio:.1f}x (goal 12x: {'MET' if ratio >= 12 else 'NOT MET'}); "
          f"largest per-step loss difference {gap:.4f}")
    if tuned:
        print(f"trainer alone, both with the allocator setting: "
              f"{fast['tokens_per_second'] / tuned['tokens_per_second']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"profile": profile.name, "steps": args.steps, "batch": args.batch,
                                               "trl_default": slow, "fast": fast, "trl_default_tuned": tuned,
                                               "speedup": ratio, "max_loss_gap": gap}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
