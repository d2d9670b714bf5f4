"""Compare one or two systems on a task: generate through a backend, score, bootstrap.

One ROUGE implementation (`compute_rouge`) serves the CLI, the app's live tab and
the benchmarks. Scores follow the DialogSum convention: F1 of ROUGE-1/2/L/Lsum,
Porter stemming on by default, each item scored against every reference and the
best one kept (per metric), with the first-reference score kept beside it. Beside
ROUGE, a meaning-level score (phisum.semantic: cosine of MiniLM sentence embeddings)
when asked for. Generation failures (empty output, output cut at max_new_tokens)
are counted and reported, never dropped. phisum.reporting renders a Report.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from phisum.data import file_sha256
from phisum.generation import BASE, Generation, GenerationSettings, InputError
from phisum.tasks import Task, get_task

METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")  # ROUGE, always computed
SEMANTIC = "semsim"  # phisum.semantic.METRIC, computed when asked for
METRIC_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum",
                 SEMANTIC: "MiniLM cosine"}
Progress = Callable[[int, int, str], None]

# ------------------------------------------------------------------ ROUGE

_REGEX_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")


@lru_cache(maxsize=1)
def sentence_splitter() -> str:
    """'nltk-punkt' when nltk's punkt model is installed, else 'regex'.

    ROUGE-Lsum needs one sentence per line; punkt is the usual choice but needs a
    data download that may be absent offline, so the splitter used is recorded.
    """
    try:
        import nltk

        for resource in ("tokenizers/punkt_tab", "tokenizers/punkt"):
            try:
                nltk.data.find(resource)
                nltk.sent_tokenize("Probe one. Probe two.")
                return "nltk-punkt"
            except LookupError:
                continue
    except ImportError:
        pass
    return "regex"


def split_sentences(text: str) -> str:
    """Sentences of `text`, one per line (what rougeLsum expects)."""
    text = text.strip()
    if not text:
        return ""
    if sentence_splitter() == "nltk-punkt":
        import nltk

        parts = [s for line in text.splitlines() for s in nltk.sent_tokenize(line)]
    else:
        parts = _REGEX_SENTENCE_END.split(text)
    return "\n".join(p.strip() for p in parts if p and p.strip())


@lru_cache(maxsize=2)
def _scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(METRICS), use_stemmer=use_stemmer)


def score_references(predictions: Sequence[str], references: Sequence[Sequence[str]],
                     use_stemmer: bool = True) -> list[list[dict]]:
    """F1 of every prediction against each of its references: [item][reference][metric]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    scorer = _scorer(bool(use_stemmer))
    table = []
    for index, (prediction, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"item {index} has no reference summary")
        pred = split_sentences(prediction or "")
        table.append([{m: s.fmeasure for m, s in scorer.score(split_sentences(r), pred).items()} for r in refs])
    return table


def compute_rouge(predictions: Sequence[str], references: Sequence[Sequence[str]],
                  use_stemmer: bool = True) -> list[dict]:
    """Per item {"rouge1","rouge2","rougeL","rougeLsum"} F1, each the max over the item's references."""
    return [best_of(per_ref) for per_ref in score_references(predictions, references, use_stemmer)]


def best_of(per_reference: list[dict]) -> dict:
    return {m: max(s[m] for s in per_reference) for m in METRICS}


# ------------------------------------------------------------------ statistics

def bootstrap_indices(n: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(values: Sequence[float], resamples: int = 1000, seed: int = 0,
                 indices: np.ndarray | None = None) -> dict:
    """Mean and 95% percentile interval of the mean. Paired when `values` are differences."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan")}
    idx = bootstrap_indices(values.size, resamples, seed) if indices is None else indices
    means = values[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high)}


# ------------------------------------------------------------------ generation

def generate_outputs(backend, texts: Sequence[str], systems: Sequence[str], settings: GenerationSettings,
                     task: str | Task = "dialogsum", batch_size: int = 8, progress: Progress | None = None,
                     sort_by_length: bool = True) -> dict[str, list[Generation]]:
    """{system: generations in input order}. A pair of systems shares each generate call.

    `batch_size` counts generate rows: a pair takes two rows per item. Inputs are sorted
    by length first so a batch holds similar lengths (less padding)."""
    from phisum import inference

    n, systems = len(texts), list(systems)
    order = sorted(range(n), key=lambda i: len(texts[i])) if sort_by_length else list(range(n))
    out: dict[str, list[Generation | None]] = {s: [None] * n for s in systems}
    total, done = n * len(systems), 0
    label = "+".join(systems)
    step = max(1, batch_size // len(systems))
    if progress:
        progress(0, total, f"generating {label}")
    for start in range(0, n, step):
        chunk = order[start:start + step]
        batch = [texts[i] for i in chunk]
        if len(systems) == 2:
            gens = inference.compare(backend, batch, systems, settings, task, batch_size=2 * len(chunk))
        else:
            gens = [(g,) for g in inference.summarize(backend, batch, systems[0], settings, task, batch_size)]
        for i, row in zip(chunk, gens):
            for system, gen in zip(systems, row):
                out[system][i] = gen
        done += len(systems) * len(chunk)
        if progress:
            progress(done, total, f"generating {label}")
    return out  # type: ignore[return-value]


def failure_counts(gens: Sequence[Generation]) -> dict:
    return {"empty": sum(g.empty for g in gens),
            "cut_at_max_new_tokens": sum(g.finish_reason == "length" for g in gens)}


def describe_systems(backend, systems: Sequence[str]) -> dict:
    """Model identity for metrics.json: backend, base id, and per adapter its source and weights' sha256."""
    info = backend.describe()
    identity = {k: info[k] for k in ("backend", "profile", "base_model", "dtype", "device") if k in info}
    identity["adapters"] = {}
    for system in systems:
        if system != BASE:
            path = backend.paths.get(system)
            weights = Path(path) / "adapter_model.safetensors" if path else None
            identity["adapters"][system] = {"path": backend.adapters.get(system, "server"),
                                            "sha256": file_sha256(weights) if weights and weights.exists() else None}
    return identity


# ------------------------------------------------------------------ the report

@dataclass
class Report:
    task: str
    systems: list[str]
    rows: list[dict]
    aggregate: dict  # {system: {metric: mean}} (max over references)
    first_ref_aggregate: dict  # {system: {metric: mean}} against the first reference only
    intervals: dict  # {system: {metric: {"mean","low","high"}}} bootstrap 95% CI of each mean
    delta: dict  # {metric: {"mean","low","high"}} systems[1] - systems[0]; {} with one system
    delta_first_ref: dict
    failures: dict  # {system: {"empty": n, "cut_at_max_new_tokens": n}}
    items_per_second: float
    seconds: float
    metrics_used: tuple[str, ...] = METRICS  # ROUGE, plus SEMANTIC when it was computed
    config: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    def to_frame(self):
        """One row per item: id, reference (the first), `<system>` output, `<system>_<metric>` scores."""
        import pandas as pd

        records = []
        for row in self.rows:
            record = {"id": row["id"], "reference": row["references"][0]}
            for system in self.systems:
                record[system] = row["outputs"][system]
            for system in self.systems:
                for metric in self.metrics_used:
                    record[f"{system}_{metric}"] = row["scores"][system][metric]
            records.append(record)
        columns = ["id", "reference", *self.systems,
                   *(f"{s}_{m}" for s in self.systems for m in self.metrics_used)]
        return pd.DataFrame.from_records(records, columns=columns)

    def metrics(self) -> dict:
        """Everything metrics.json holds."""
        return {"task": self.task, "systems": self.systems, "items": len(self.rows), "config": self.config,
                "model": self.identity, "data": self.data, "metrics": list(self.metrics_used),
                "scores": {"max_over_references": self.aggregate, "first_reference": self.first_ref_aggregate,
                           "ci95": self.intervals},
                "delta": self.delta, "delta_first_reference": self.delta_first_ref,
                "failures": self.failures,
                "throughput": {"seconds": self.seconds, "items_per_second": self.items_per_second,
                               "summaries_per_minute": 60 * self.items_per_second * len(self.systems)}}


def evaluate(backend, items: Sequence[dict], systems: Sequence[str] | None = None, task: str | Task = "dialogsum",
             settings: GenerationSettings | None = None, batch_size: int = 8, progress: Progress | None = None,
             use_stemmer: bool = True, resamples: int = 1000, seed: int = 0, semantic: bool = False) -> Report:
    """Generate every system's output for every item, score it and bootstrap the difference.

    items: rows from the task's loader (e.g. load_dialogsum: {"id", "dialogue", "summaries", ...}).
    systems: one system, or a pair compared as systems[1] - systems[0] (default: base vs the task's adapter).
    semantic: also score meaning (phisum.semantic); loads its model on first use.
    progress: called as progress(done, total, desc) while generating (done/total count outputs).
    """
    task = get_task(task)
    systems = list(systems or (BASE, task.adapter))
    if not 1 <= len(systems) <= 2 or len(set(systems)) != len(systems):
        raise InputError(f"evaluate one system or a pair of different systems, got {systems}")
    if task.kind != "summarize":
        raise InputError(f"task {task.name!r} has no reference summaries to score; evaluate a summarization task")
    if not items:
        raise InputError("no items to evaluate")
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    if resamples < 1:
        raise InputError(f"bootstrap resamples must be at least 1, got {resamples}")
    for system in systems:
        backend.require(system)
    settings = (settings or GenerationSettings()).validate(backend.context_length)
    texts = [task.text(item) for item in items]
    references = [task.references(item) for item in items]

    t0 = time.perf_counter()
    gens = generate_outputs(backend, texts, systems, settings, task, batch_size, progress)
    seconds = time.perf_counter() - t0
    if progress:
        progress(len(items) * len(systems), len(items) * len(systems), "scoring")

    metrics = METRICS + ((SEMANTIC,) if semantic else ())
    scores, first = {}, {}
    for system in systems:
        predictions = [g.text for g in gens[system]]
        table = score_references(predictions, references, use_stemmer)
        if semantic:
            from phisum.semantic import semantic_scores

            for per_ref, sims in zip(table, semantic_scores(predictions, references)):
                for cell, sim in zip(per_ref, sims):
                    cell[SEMANTIC] = sim
        scores[system] = [{m: max(s[m] for s in per_ref) for m in metrics} for per_ref in table]
        first[system] = [per_ref[0] for per_ref in table]

    rows = []
    for i, item in enumerate(items):
        rows.append({"id": item["id"], "input": texts[i], "references": references[i],
                     "outputs": {s: gens[s][i].text for s in systems},
                     "scores": {s: scores[s][i] for s in systems},
                     "first_ref_scores": {s: first[s][i] for s in systems},
                     "finish": {s: gens[s][i].finish_reason for s in systems},
                     "new_tokens": {s: gens[s][i].new_tokens for s in systems},
                     "notices": sorted({n for s in systems for n in gens[s][i].notices})})

    def mean_of(table):
        return {s: {m: float(np.mean([r[m] for r in table[s]])) for m in metrics} for s in systems}

    idx = bootstrap_indices(len(items), resamples, seed)  # one resample set: paired across systems
    intervals = {s: {m: bootstrap_ci([r[m] for r in scores[s]], indices=idx) for m in metrics} for s in systems}
    delta, delta_first = {}, {}
    if len(systems) == 2:
        a, b = systems
        for m in metrics:
            delta[m] = bootstrap_ci([y[m] - x[m] for x, y in zip(scores[a], scores[b])], indices=idx)
            delta_first[m] = bootstrap_ci([y[m] - x[m] for x, y in zip(first[a], first[b])], indices=idx)

    config = {"task": task.name, "systems": systems, "items": len(items), "batch_size": batch_size,
              "generation": settings.to_dict(), "use_stemmer": bool(use_stemmer),
              "sentence_splitter": sentence_splitter(), "multi_reference": "max over references per metric",
              "bootstrap": {"resamples": resamples, "seed": seed, "interval": "95% percentile, paired"}}
    if semantic:
        from phisum.semantic import model_info

        config["semantic"] = model_info()
    return Report(task=task.name, systems=systems, rows=rows, aggregate=mean_of(scores),
                  first_ref_aggregate=mean_of(first), intervals=intervals, delta=delta, delta_first_ref=delta_first,
                  failures={s: failure_counts(gens[s]) for s in systems},
                  items_per_second=len(items) / seconds if seconds > 0 else float("inf"), seconds=seconds,
                  metrics_used=metrics, config=config, identity=describe_systems(backend, systems))
