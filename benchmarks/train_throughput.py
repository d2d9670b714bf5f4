"""Trained tokens/s and peak memory: trl SFTTrainer defaults vs phisum's CPU trainer and its variants.

Every variant trains the same LoRA (same init) on the same base, rows, batches and
steps, each in a FRESH process (so its peak RSS is its own and process-wide
settings such as the allocator do not leak into the next), one after the other,
so the RATIOS are meaningful on a shared CPU. Per-step losses are printed next to
each other: they must agree within bf16 noise (the variants change how the loss
is computed and when memory is freed, not what the loss is).

Variants:
  trl           trl's SFTTrainer with its defaults (activation checkpointing, full logits)
  one-backward  the trainer as the issue found it: one backward per batch (all length groups'
                graphs alive at once), whole-vocabulary logits, glibc keeping freed memory
  phisum        the default trainer: one forward+backward per length group (at most max_group_tokens
                padded tokens), the LM head's loss in chunks (phisum.head_loss), eager attention,
                glibc keeping freed memory, trimmed every 8 steps or once RSS has grown 1.5x since the
                last trim (checked after each group); `phisum train` on a CPU runs it as
                "phisum+jemalloc[oversize_threshold:0;dirty_decay_ms:-1;muzzy_decay_ms:-1]"
  phisum-sdpa   the same with torch's scaled_dot_product_attention (no score matrices kept)
  phisum-plainhead  the same with the head + cross-entropy over a group's completion tokens at once
                (vocabulary-wide logits alive until the backward)
  phisum-trim-each  glibc's default allocator settings, trimmed after every step (the previous default)
  phisum-notrim glibc's defaults, never trimmed
  phisum-keep   freed memory kept, never trimmed (fragmentation grows with the step count)
  phisum-fixed  trimmed every 8 steps, not on RSS growth (the default until 2026-11-27)
  NAME@TOKENS   a per-group variant with groups of at most TOKENS padded tokens (phisum@1536)
  NAME/N        a per-group variant trimmed every N steps (phisum/2; phisum@1536/4)
  NAME+jemalloc NAME with jemalloc as the process's allocator (LD_PRELOAD; Debian's libjemalloc2),
                as `phisum train` runs it; NAME+jemalloc[oversize_threshold:0;dirty_decay_ms:-1] with
                that MALLOC_CONF (';' for its ',')
  NAME+thp      NAME with torch's CPU tensors on transparent huge pages (THP_MEM_ALLOC_ENABLE=1):
                a freed and re-faulted gigabyte costs 512 faults instead of 262,144

Usage:
  python benchmarks/train_throughput.py --rows recipe --data ../shared/data/dialogsum-full --steps 16 \
      --variants one-backward,phisum,phisum-trim-each --iterations 2   # the README's memory row (~12 min)
  python benchmarks/train_throughput.py                 # embedded Gemma 3 270M, the longest DialogSum rows
  python benchmarks/train_throughput.py --profile tiny  # seconds, for a smoke check
  python benchmarks/train_throughput.py --steps 4 --batch 8 --json out.json
  python benchmarks/train_throughput.py --variants one-backward,phisum   # a subset (trl is slow)
  python benchmarks/train_throughput.py --rows recipe --data ../shared/data/dialogsum-full --steps 12 \
      --variants one-backward,phisum --iterations 3    # interleaved rounds: medians, and the spread
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> (label, fast trainer, trainer kwargs, attention)
    "trl": ("trl SFTTrainer defaults", False, {}, None),
    "one-backward": ("one backward per batch (the old trainer)", True,
                     {"max_group_tokens": None, "release_every": 0, "release_above": None, "chunked_head": False},
                     "eager"),
    "phisum": ("phisum fast CPU path", True, {}, "eager"),
    "phisum-sdpa": ("phisum, sdpa attention", True, {}, "sdpa"),
    "phisum-plainhead": ("phisum, whole-vocabulary logits", True, {"chunked_head": False}, "eager"),
    "phisum-trim-each": ("phisum, glibc defaults, trim each step", True,
                         {"keep_memory": False, "release_every": 1}, "eager"),
    "phisum-notrim": ("phisum, glibc defaults, no trim", True,
                      {"keep_memory": False, "release_every": 0, "release_above": None}, "eager"),
    "phisum-keep": ("phisum, freed memory kept, no trim", True, {"release_every": 0, "release_above": None}, "eager"),
    "phisum-fixed": ("phisum, trimmed every 8 steps only", True, {"release_above": None}, "eager"),
}


def variant(name: str) -> tuple:
    """VARIANTS[name]; "NAME@TOKENS" is NAME with groups of at most TOKENS padded tokens, "NAME/N" NAME
    trimmed every N steps, "NAME^X" NAME releasing early once RSS passes X times its last low (the
    recipe's cpu_release_above), in that order (phisum@1536/4^1.5); "+jemalloc[CONF]" and "+thp"
    change the process's allocator and pages (variant_environment)."""
    import re

    match = re.fullmatch(r"([\w-]+)(?:@(\d+))?(?:/(\d+))?(?:\^(\d+(?:\.\d+)?))?"
                         r"(\+jemalloc(?:\[[\w:;.-]+\])?)?(\+thp)?", name)
    if not match or match.group(1) not in VARIANTS:
        raise KeyError(name)
    base, tokens, every, above, jemalloc, thp = match.groups()
    label, fast, kwargs, attention = VARIANTS[base]
    if tokens:
        label, kwargs = f"{label}, groups <= {tokens}", {**kwargs, "max_group_tokens": int(tokens)}
    if every:
        label, kwargs = f"{label}, trim every {every}", {**kwargs, "release_every": int(every)}
    if above:
        label, kwargs = f"{label}, early release at {above}x", {**kwargs, "release_above": float(above)}
    if jemalloc:
        label = f"{label}, jemalloc" + (f" {jemalloc_conf(jemalloc)}" if "[" in jemalloc else "")
    if thp:
        label = f"{label}, huge pages"
    return label, fast, kwargs, attention


def jemalloc_conf(suffix: str) -> str | None:
    """The MALLOC_CONF of "+jemalloc[KEY:VALUE;...]" (';' for MALLOC_CONF's ','), else None."""
    return suffix[suffix.index("[") + 1:suffix.index("]")].replace(";", ",") if "[" in suffix else None


def variant_environment(name: str) -> dict:
    """Environment for the variant's process: jemalloc preloaded for +jemalloc, as `phisum train` runs
    (phisum.allocator), with the variant's MALLOC_CONF when it names one; +thp asks torch's CPU
    allocator for transparent huge pages (THP_MEM_ALLOC_ENABLE, read when torch loads)."""
    variant(name)
    env = {"THP_MEM_ALLOC_ENABLE": "1"} if name.endswith("+thp") else {}
    if "+jemalloc" not in name:
        return env
    from phisum.allocator import jemalloc_environment

    preloaded = jemalloc_environment()
    if preloaded is None:
        raise SystemExit(f"{name}: jemalloc not found; install it (apt-get install libjemalloc2)")
    env.update(preloaded)
    if jemalloc_conf(name):
        env["MALLOC_CONF"] = jemalloc_conf(name)
    return env


def known_variant(name: str) -> bool:
    try:
        return bool(variant(name))
    except KeyError:
        return False


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

    _, fast, trainer_kwargs, attention = variant(name)
    if args.threads:
        torch.set_num_threads(args.threads)
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
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF)
    trainer.train()
    after = resource.getrusage(resource.RUSAGE_SELF)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # The first step pays one-off costs (oneDNN kernel selection, allocator growth): timed apart.
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    seconds = sum(meter.step_seconds[1:])
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "first_step_seconds": meter.step_seconds[0], "losses": losses, "peak_rss_mb": peak_rss_mb(),
            "rss_mb_per_step": memory.rss_mb, "trims": getattr(trainer, "releases", 0),
            # page faults and kernel time: what returning freed memory costs when it is faulted back in
            "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / args.steps,
            "sys_share": (after.ru_stime - before.ru_stime) / max(after.ru_utime - before.ru_utime
                                                                  + after.ru_stime - before.ru_stime, 1e-9),
            "threads": torch.get_num_threads()}


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (its own peak RSS and losses), peak RSS as the median too."""
    import statistics

    ordered = sorted(runs, key=lambda r: r["tokens_per_second"])
    return {**ordered[(len(ordered) - 1) // 2], "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs)}


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
    parser.add_argument("--iterations", type=int, default=1,
                        help="rounds over the variants, interleaved (fresh processes); the table shows medians")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is an untimed warm-up)")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if not known_variant(v)]
    if unknown or not names:
        parser.error(f"unknown variant {unknown[0] if unknown else '(none)'}; choose from {', '.join(VARIANTS)}")
    if not Path(args.data).exists():
        print(f"DialogSum not found at {args.data} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    from benchmarks._util import RESULT_TAG, load_line

    if args.one:
        print(RESULT_TAG + json.dumps(run_variant(args.one, args)))
        return 0
    import os
    import subprocess
    import tempfile

    print(f"{args.profile}: {args.steps} steps of batch {args.batch} DialogSum rows ({args.rows}); {load_line()}",
          flush=True)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.iterations):
            for name in names:
                command = [sys.executable, __file__, "--one", name, "--workdir", tmp, "--profile", args.profile,
                           "--data", args.data, "--steps", str(args.steps), "--batch", str(args.batch),
                           "--rows", args.rows]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                if args.max_group_tokens:
                    command += ["--max-group-tokens", str(args.max_group_tokens)]
                proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                      env={**os.environ, **variant_environment(name)})
                line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)), None)
                if line is None:
                    print(f"variant {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
                    return 1
                runs.setdefault(name, []).append(json.loads(line[len(RESULT_TAG):]))
                r = runs[name][-1]
                print(f"  round {round_ + 1}: {name} {r['tokens_per_second']:.1f} tokens/s, "
                      f"peak {r['peak_rss_mb']:.0f} MB ({load_line()})", flush=True)
    results = {name: median_run(rs) for name, rs in runs.items()}
    print(f"{'variant':<36}{'tokens/s':>10}{'seconds':>10}{'peak RSS MB':>13}{'last RSS MB':>13}"
          f"{'faults/step':>13}{'sys %':>7}{'trims':>7}   losses per step")
    for name, r in results.items():
        print(f"{variant(name)[0]:<36}{r['tokens_per_second']:>10.1f}{r['seconds']:>10.1f}"
              f"{r['peak_rss_mb']:>13.0f}{r['rss_mb_per_step'][-1]:>13.0f}"
              f"{r['minor_faults_per_step']:>13.0f}{100 * r['sys_share']:>7.1f}{r.get('trims', 0):>7}   "
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
    if args.iterations > 1:
        for name, rs in runs.items():
            print(f"{name} per round: tokens/s {[round(r['tokens_per_second'], 1) for r in rs]}, "
                  f"peak RSS MB {[round(r['peak_rss_mb']) for r in rs]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"profile": args.profile, "steps": args.steps, "batch": args.batch,
                                               "results": results, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
