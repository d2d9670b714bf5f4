"""What a finished training run leaves beside its adapter: a summary (training_summary.json), a
short TRAINING.md and the loss curve (loss_curve.png)."""

from __future__ import annotations

import shlex
from pathlib import Path


def peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _redacted_command(argv) -> str:
    """The command as run, minus any token passed on the command line (it lands in a file)."""
    from phisum.hub import scrub

    words, hide = [], False
    for arg in argv:
        words.append("***" if hide else scrub(arg))
        hide = arg in ("--hub_token", "--token")
        if arg.startswith(("--hub_token=", "--token=")):
            words[-1] = arg.split("=", 1)[0] + "=***"
    return "python -m phisum train " + " ".join(shlex.quote(w) for w in words)


def summarize_run(trainer, reports, argv, train, wall: float, fast: bool) -> dict:
    import torch

    from phisum import allocator

    history = trainer.state.log_history
    meter = trainer.phisum_meter
    world = trainer.accelerator.num_processes
    trained = getattr(trainer, "trained_tokens", None)
    tokens = trained * world if trained is not None else int(trainer._total_train_tokens)
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {
        "command": _redacted_command(argv),
        "data": [{"source": r.source, "split": r.split, "report": r.summary(), "sha256": r.sha256} for r in reports],
        "train_examples": len(train),
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "processes": world,
        "trainer": "completion-only CPU trainer" if fast else "trl SFTTrainer",
        "device": trainer.args.device.type,
        "allocator": allocator.active(),
        "trained_tokens": tokens,
        "train_seconds": round(meter.train_seconds, 1),
        "tokens_per_second": round(tokens / meter.train_seconds, 1) if meter.train_seconds else None,
        "wall_seconds": round(wall, 1),
        "final_train_loss": round(losses[-1], 4) if losses else None,
        "final_eval_loss": round(evals[-1], 4) if evals else None,
        "best_eval_loss": round(min(evals), 4) if evals else None,
        "peak_memory_mb": round(peak_memory_mb()),
        "torch_threads": torch.get_num_threads(),
    }


def write_training_notes(summary: dict, path: Path) -> None:
    """A short human-readable TRAINING.md beside the adapter (the json has everything)."""
    data = "\n".join(f"- {d['report']}; sha256 `{d['sha256'] or 'n/a (Hub)'}`" for d in summary["data"])
    path.write_text(f"""# How this adapter was trained

```
{summary['command']}
```

Data:
{data}

| steps | epochs | examples | trained tokens | tokens/s | train s | wall s | final train loss | final eval loss | best eval loss | peak memory MB |
|---|---|---|---|---|---|---|---|---|---|---|
| {summary['steps']} | {summary['epochs']} | {summary['train_examples']} | {summary['trained_tokens']} | \
{summary['tokens_per_second']} | {summary['train_seconds']} | {summary['wall_seconds']} | {summary['final_train_loss']} | \
{summary['final_eval_loss']} | {summary['best_eval_loss']} | {summary['peak_memory_mb']} |

Trainer: {summary['trainer']}, {summary['processes']} process(es), {summary['torch_threads']} torch threads.
Loss curve: loss_curve.png (train and eval). Machine-readable: training_summary.json.
""")
