"""Validation scores of a run's checkpoints against the number of training examples they saw.

What more data buys: each checkpoint of one run (e.g. the full-data DialogSum recipe, saved
every 75 steps) is loaded as an adapter on one base and scored on the same validation items
(adapter only, greedy, ROUGE and the MiniLM cosine); the x axis is training dialogues seen
(global_step x batch size x accumulation: in a one-epoch run each is seen once).
`--extra NAME=PATH@DIALOGUES` adds another adapter as a point of its own (the quick adapter:
601 dialogues, seen twice in its 2 epochs).

Usage:
  python scripts/evaluate_checkpoints.py --run outputs/embedded-dialogsum-full \\
      --steps 75,375,750,1125,1554 --data ../shared/data/dialogsum --n 200 \\
      --extra quick=assets/adapters/embedded/dialogsum-quick@601 \\
      --out assets/adapters/embedded/dialogsum/data_scaling
Writes OUT.json and OUT.png. Checkpoints that are incomplete are skipped with a note. `--reuse`
keeps the points OUT.json already holds (same split, items and data) and scores only the new ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def checkpoints(run: Path, steps: list[int] | None) -> dict[str, tuple[Path, int]]:
    """name -> (folder, examples seen) for the run's complete checkpoints."""
    from phisum.training import checkpoint_missing

    found = {}
    for folder in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])):
        step = int(folder.name.split("-")[-1])
        if steps and step not in steps:
            continue
        if checkpoint_missing(folder):
            print(f"skipping {folder.name}: {checkpoint_missing(folder)}", file=sys.stderr)
            continue
        state = json.loads((folder / "trainer_state.json").read_text())
        per_step = state["train_batch_size"] * state.get("gradient_accumulation_steps", 1)
        found[f"step-{step}"] = (folder, state["global_step"] * per_step)
    return found


def previous_points(path: Path, split: str, items: int, data: str) -> dict[str, dict]:
    """name -> point from an earlier OUT.json scored on the same split, items and data."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if (old.get("split"), old.get("items"), old.get("data")) != (split, items, data):
        print(f"not reusing {path}: scored on other items", file=sys.stderr)
        return {}
    return {p["name"]: p for p in old["points"]}


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    run = sorted((p for p in points if p["kind"] == "checkpoint"), key=lambda p: p["examples"])
    for metric, label in (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"),
                          ("semsim", "MiniLM cosine")):
        if run and metric in run[0]["scores"]:
            line, = ax.plot([p["examples"] for p in run], [p["scores"][metric] for p in run], "o-", label=label)
            for extra in (p for p in points if p["kind"] == "extra"):
                ax.plot(extra["examples"], extra["scores"][metric], "s", color=line.get_color(), mfc="none", ms=9)
    for extra in (p for p in points if p["kind"] == "extra"):
        ax.annotate(extra["name"], (extra["examples"], extra["scores"]["rouge1"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("training dialogues seen (log scale)")
    ax.set_ylabel("validation score (max over references)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the run's output_dir (holds checkpoint-N folders)")
    parser.add_argument("--steps", default=None, help="comma-separated steps to score (default: every checkpoint)")
    parser.add_argument("--profile", default="embedded")
    parser.add_argument("--data", default="../shared/data/dialogsum")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=PATH@DIALOGUES")
    parser.add_argument("--no-semantic", action="store_true", help="ROUGE only (skip the MiniLM cosine)")
    parser.add_argument("--out", required=True, help="path without suffix: OUT.json and OUT.png are written")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the scores OUT.json already holds for the same split and items (a run's new "
                             "checkpoints are scored, the old ones not again)")
    args = parser.parse_args(argv)

    from phisum.startup import quiet_library_notices

    quiet_library_notices()

    from tqdm.auto import tqdm

    from phisum.backends import load_backend
    from phisum.evaluation import evaluate
    from phisum.generation import GenerationSettings
    from phisum.semantic import available
    from phisum.tasks import TASKS

    task = TASKS["dialogsum"]
    steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    adapters = checkpoints(Path(args.run), steps)
    for spec in args.extra:
        name, _, rest = spec.partition("=")
        path, _, seen = rest.rpartition("@")
        if not (name and path and seen.isdigit()):
            parser.error(f"--extra expects NAME=PATH@DIALOGUES, got {spec!r}")
        adapters[name] = (Path(path), int(seen))
    if not adapters:
        print(f"error: no complete checkpoint in {args.run}", file=sys.stderr)
        return 2
    rows, report = task.load(args.data, args.split)
    items = rows[:args.n]
    print(f"{report.summary()}; scoring {len(items)} items with {len(adapters)} adapters", file=sys.stderr)
    backend = load_backend(args.profile, "transformers", {n: str(p) for n, (p, _) in adapters.items()},
                           batch_size=args.batch_size)
    if backend.missing:
        print(f"error: {next(iter(backend.missing.values()))}", file=sys.stderr)
        return 2
    out = Path(args.out)
    kept = previous_points(out.with_suffix(".json"), args.split, len(items), report.summary()) if args.reuse else {}
    points = []
    for name, (folder, seen) in tqdm(adapters.items(), desc="adapters"):
        if name in kept:
            points.append(kept[name])
            continue
        result = evaluate(backend, items, systems=[name], task=task, settings=GenerationSettings(max_new_tokens=128),
                          batch_size=args.batch_size, semantic=available() and not args.no_semantic)
        points.append({"name": name, "kind": "checkpoint" if name.startswith("step-") else "extra",
                       "examples": seen, "scores": result.aggregate[name],
                       "ci95": result.intervals[name], "failures": result.failures[name]})
        print(f"{name:<14} {seen:>6} dialogues  " + "  ".join(f"{m} {v:.4f}" for m, v in points[-1]["scores"].items()),
              file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"run": args.run, "data": report.summary(), "items": len(items),
                                                    "split": args.split, "points": points}, indent=2) + "\n")
    plot(points, out.with_suffix(".png"), f"DialogSum {args.split}, first {len(items)} items: "
                                          "score against training dialogues seen")
    print(out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
