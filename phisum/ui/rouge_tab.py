"""Tab 3: live ROUGE. Sample N DialogSum items, summarise with base and adapter, score."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import gradio as gr

from phisum.generation import BASE, GenerationSettings, InputError
from phisum.ui.common import SAMPLES, gpu, user_error

ADAPTER = "dialogsum"
DATA_ENV = "PHISUM_DIALOGSUM_DIR"
MAX_N = 50
METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@lru_cache(maxsize=4)
def load_pool(data_dir: str | None, split: str = "test") -> tuple[tuple[dict, ...], str]:
    """Items and a sentence naming where they came from: a local folder (flag or
    PHISUM_DIALOGSUM_DIR), else the Hub dataset when reachable, else the bundled samples."""
    from phisum.data import DIALOGSUM_HUB_ID, DataError, load_dialogsum

    tried = []
    if data_dir:
        try:
            rows, report = load_dialogsum(data_dir, split)
            return tuple(rows), f"{report.summary()}"
        except DataError as exc:
            tried.append(str(exc))
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            rows, report = load_dialogsum(DIALOGSUM_HUB_ID, split)
            return tuple(rows), f"Hub dataset {DIALOGSUM_HUB_ID} [{split}], {len(rows)} items"
        except DataError as exc:
            tried.append(str(exc))
    rows, report = load_dialogsum(SAMPLES, split)
    why = f" ({'; '.join(tried)})" if tried else ""
    return tuple(rows), f"bundled sample dialogues ({len(rows)} items with references){why}"


def sample_items(pool, n: int, seed: int) -> tuple[list[dict], str]:
    if not isinstance(n, (int, float)) or int(n) != n or not 1 <= n <= MAX_N:
        raise InputError(f"N must be a whole number from 1 to {MAX_N}, got {n}")
    n = int(n)
    note = ""
    if n > len(pool):
        note = f"Asked for {n} items but the source has {len(pool)}; using all of them."
        n = len(pool)
    return random.Random(int(seed)).sample(list(pool), n), note


def aggregate_markdown(report, systems) -> str:
    names = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
    header = "| system | " + " | ".join(names[m] for m in METRICS) + " |\n|---|" + "---|" * len(METRICS)
    lines = [header]
    for system in systems:
        lines.append(f"| {system} | " + " | ".join(f"{report.aggregate[system][m]:.3f}" for m in METRICS) + " |")
    if getattr(report, "delta", None):
        cells = [f"{report.delta[m]['mean']:+.3f} [{report.delta[m]['low']:+.3f}, {report.delta[m]['high']:+.3f}]"
                 for m in METRICS]
        lines.append("| **adapter − base** (95% CI) | " + " | ".join(cells) + " |")
    failures = [f"{s}: {v['empty']} empty, {v['cut_at_max_new_tokens']} cut at the token limit"
                for s, v in report.failures.items() if any(v.values())]
    text = "\n".join(lines)
    text += f"\n\n{report.items_per_second * 60:.1f} summaries per minute · stemming on · max over references"
    if failures:
        text += "\n\n**Generation failures:** " + "; ".join(failures)
    return text


def run_live_rouge(engine, n, seed, max_new, data_dir=None, progress=None):
    from phisum.evaluation import evaluate

    pool, source = load_pool(data_dir or os.environ.get(DATA_ENV))
    try:
        items, note = sample_items(pool, n, seed)
    except InputError as exc:
        raise user_error(exc) from None
    systems = (BASE, ADAPTER) if ADAPTER in engine.adapters else (BASE,)
    notes = [f"Data: {source}."] + ([note] if note else [])
    if len(systems) == 1:
        notes.append(f"**Note:** Adapter `{ADAPTER}` not loaded ({engine.missing.get(ADAPTER, 'not configured')}): "
                     "scoring the base model only.")

    def report_progress(done, total, desc):
        if progress is not None:
            progress(done / max(total, 1), desc=desc)

    settings = GenerationSettings(max_new_tokens=int(max_new))
    report = evaluate(engine, items, systems=systems, settings=settings, progress=report_progress)
    out_dir = Path(tempfile.mkdtemp(prefix="phisum-rouge-"))
    report.save(out_dir / "report")
    archive = shutil.make_archive(str(out_dir / "live-rouge-report"), "zip", out_dir / "report")
    frame = report.to_frame()
    return ("\n\n".join(notes), frame, aggregate_markdown(report, systems),
            str(out_dir / "report" / "rouge.png"), archive)


def create_rouge_tab(engine, data_dir: str | None = None) -> None:
    with gr.Tab("Live ROUGE", id="rouge"):
        gr.Markdown("Sample DialogSum dialogues, summarise each with the base model and the fine-tuned "
                    "adapter (greedy, same prompt), and score both against the human references.")
        with gr.Row():
            n = gr.Slider(1, MAX_N, value=5, step=1, label="N dialogues", elem_id="rouge-n")
            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="rouge-seed")
            max_new = gr.Slider(16, 256, value=96, step=8, label="Max new tokens")
        button = gr.Button("Run live ROUGE", variant="primary", elem_id="rouge-btn")
        note = gr.Markdown(elem_id="rouge-note")
        aggregate = gr.Markdown(elem_id="rouge-aggregate")
        with gr.Row():
            chart = gr.Image(label="ROUGE F1, base vs adapter (95% CI whiskers on the difference)",
                             type="filepath", elem_id="rouge-chart", show_label=True)
            download = gr.File(label="Download the report (predictions, metrics, markdown, chart)",
                               elem_id="rouge-download")
        table = gr.Dataframe(label="Per item", wrap=True, elem_id="rouge-table")

        @gpu
        def run(n_value, seed_value, max_new_value, progress=gr.Progress()):
            return run_live_rouge(engine, n_value, seed_value, max_new_value, data_dir, progress)

        button.click(run, [n, seed, max_new], [note, table, aggregate, chart, download],
                     api_name="live_rouge", concurrency_id="model")
