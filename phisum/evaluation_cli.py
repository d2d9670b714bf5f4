"""`python -m phisum evaluate`: before/after ROUGE report for a task's test split.

Example (the committed embedded report):
  python -m phisum evaluate --profile embedded --task dialogsum --data ../shared/data/dialogsum \\
      --split test --n 200 --adapters base,dialogsum --out assets/reports/embedded-dialogsum --no-example-text

Items: the first N rows of the split in file order (deterministic, like the published
tables); --shuffle takes N rows after a shuffle seeded by --seed instead.
Writes predictions.jsonl, metrics.json, report.md and rouge.png into --out.
Exit codes: 0 done, 2 bad input (data, adapters, options).
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m phisum evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="dialogsum", choices=("dialogsum",))
    p.add_argument("--data", default=None,
                   help="folder of split files, one jsonl/csv file, or a Hub dataset id (default knkarthick/dialogsum)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=None, help="number of items (default: all)")
    p.add_argument("--shuffle", action="store_true", help="sample --n items after a seeded shuffle, not the first N")
    p.add_argument("--adapters", default="base,dialogsum",
                   help="one system or a comparison pair, comma-separated: base,ADAPTER (default base,dialogsum)")
    p.add_argument("--out", required=True, help="report folder to write")
    p.add_argument("--profile", default=None, help="auto (default), phi2, embedded or tiny")
    p.add_argument("--adapter-source", action="append", default=[], metavar="NAME=SOURCE",
                   help="load adapter NAME from a folder or Hub repo id[@revision] (repeatable)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=None, help="load the base quantized")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: the profile's")
    p.add_argument("--batch-size", type=int, default=8, help="generate rows per call; a pair uses 2 per item")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="bootstrap (and --shuffle) seed")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--no-stemmer", action="store_true", help="score without Porter stemming")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's); on a CPU shared with other jobs 1 is much steadier")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-example-text", action="store_true",
                   help="report.md names its best/worst items by id and score only, without dataset text "
                        "(for reports committed to a repository)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def select_items(rows: list[dict], n: int | None, shuffle: bool, seed: int) -> tuple[list[dict], str]:
    """The rows to evaluate and a sentence saying how they were chosen."""
    if n is not None and n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    order = list(range(len(rows)))
    if shuffle:
        import random

        random.Random(seed).shuffle(order)
    how = f"random sample (seed {seed})" if shuffle else "first rows in file order"
    if n is None or n >= len(rows):
        note = f"all {len(rows)} rows" + (f" (--n {n} asked for more than the data has)" if n and n > len(rows) else "")
        return [rows[i] for i in order], note
    return [rows[i] for i in order[:n]], f"{n} of {len(rows)} rows, {how}"


def parse_systems(text: str) -> list[str]:
    systems = [s.strip() for s in text.split(",") if s.strip()]
    if not 1 <= len(systems) <= 2 or len(set(systems)) != len(systems):
        raise ValueError(f"--adapters takes one system or two different ones (e.g. base,dialogsum), got {text!r}")
    return systems


def load_engine(args, systems: list[str]):
    """Load the base once with only the adapters this run scores."""
    from phisum.engine import Engine
    from phisum.generation import BASE
    from phisum.profiles import resolve_profile

    profile, reason = resolve_profile(args.profile)
    print(f"[phisum] {reason}", file=sys.stderr)
    sources = profile.adapter_sources()
    for spec in args.adapter_source:
        name, _, source = spec.partition("=")
        if not name or not source:
            raise ValueError(f"--adapter-source expects NAME=SOURCE, got {spec!r}")
        sources[name] = source
    wanted = {s: sources[s] for s in systems if s != BASE and s in sources}
    unknown = [s for s in systems if s != BASE and s not in sources]
    if unknown:
        raise ValueError(f"no source for adapter {unknown[0]!r}; add --adapter-source {unknown[0]}=PATH")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    engine = Engine.load(profile, adapters=wanted, dtype=args.dtype, bits=args.bits, progress=not args.no_progress)
    if engine.missing:
        name, why = next(iter(engine.missing.items()))
        raise ValueError(f"adapter {name!r} could not be loaded: {why}")
    return engine


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="[%(name)s] %(message)s")
    from phisum.adapters import AdapterError
    from phisum.data import DataError, load_dialogsum
    from phisum.generation import GenerationSettings, InputError

    try:
        systems = parse_systems(args.adapters)
        rows, data_report = load_dialogsum(args.data, args.split)  # before the model: bad data fails fast
        items, selection = select_items(rows, args.n, args.shuffle, args.seed)
        print(f"[phisum] data: {data_report.summary()}; evaluating {selection}", file=sys.stderr)
        engine = load_engine(args, systems)
        report = run(engine, items, systems, args,
                     GenerationSettings(max_new_tokens=args.max_new_tokens).validate(engine.profile.context_length))
    except (DataError, InputError, AdapterError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report.data = {"source": data_report.source, "split": args.split, "sha256": data_report.sha256,
                   "summary": data_report.summary(), "selection": selection}
    out = report.save(args.out, example_text=not args.no_example_text)
    print(_summary(report), file=sys.stderr)
    print(out)
    return 0


def run(engine, items, systems, args, settings):
    from tqdm.auto import tqdm

    from phisum.evaluation import evaluate

    bar = tqdm(total=len(items) * len(systems), unit="summary", desc="generating", disable=args.no_progress)

    def progress(done: int, total: int, desc: str) -> None:
        bar.total = total
        bar.set_description(desc)
        bar.update(done - bar.n)

    try:
        return evaluate(engine, items, systems=systems, task=args.task, settings=settings,
                        batch_size=args.batch_size, progress=progress, use_stemmer=not args.no_stemmer,
                        resamples=args.resamples, seed=args.seed)
    finally:
        bar.close()


def _summary(report) -> str:
    from phisum.evaluation import METRIC_LABELS, METRICS

    lines = [f"{'system':<16}" + "".join(f"{METRIC_LABELS[m]:>12}" for m in METRICS)]
    for s in report.systems:
        lines.append(f"{s:<16}" + "".join(f"{report.aggregate[s][m]:>12.3f}" for m in METRICS))
    if report.delta:
        lines.append(f"{'delta':<16}" + "".join(f"{report.delta[m]['mean']:>+12.3f}" for m in METRICS))
    for s, f in report.failures.items():
        lines.append(f"{s}: {f['empty']} empty, {f['cut_at_max_new_tokens']} cut at max_new_tokens "
                     f"of {len(report.rows)}")
    return "\n".join(lines)
