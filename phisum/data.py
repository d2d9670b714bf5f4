"""Datasets -> rows the trainer and the evaluator use.

Every loader returns (rows, DataReport). Bad rows (missing fields, empty text)
are counted by reason in the report and never silently dropped: callers print
`report.summary()`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

DIALOGSUM_HUB_ID = "knkarthick/dialogsum"
SPLIT_ALIASES = {"validation": ("validation", "dev", "val"), "train": ("train",), "test": ("test",)}


class DataError(ValueError):
    """A data source the user gave cannot be used; the message names file and field."""


@dataclass
class DataReport:
    source: str
    split: str
    rows_read: int = 0
    rows_kept: int = 0
    bad: Counter = field(default_factory=Counter)
    sha256: str | None = None  # of the file read, when local

    def summary(self) -> str:
        text = f"{self.source} [{self.split}]: {self.rows_kept} of {self.rows_read} rows kept"
        if self.bad:
            text += " (skipped: " + ", ".join(f"{n} {why}" for why, n in self.bad.most_common()) + ")"
        return text


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_split_file(folder: Path, split: str) -> Path:
    names = SPLIT_ALIASES.get(split, (split,))
    for name in names:
        for pattern in (f"{name}.jsonl", f"{name}.json", f"{name}.csv", f"*.{name}.jsonl", f"*.{name}.csv",
                        f"*_{name}.jsonl", f"*{name}*.jsonl", f"*{name}*.csv"):
            hits = sorted(folder.glob(pattern))
            if hits:
                return hits[0]
    raise DataError(f"no {split} file in {folder} (looked for {', '.join(n + '.jsonl/.csv' for n in names)})")


def read_records(path: Path) -> list[dict]:
    """jsonl, a JSON list, or csv with a header row."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; expected jsonl or csv") from None
    if suffix == ".json" and text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number} is not valid JSON ({exc.msg}); expected one object per line") \
                    from None
    if records and not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: every row must be a JSON object")
    return records


def _load_records(source: str | Path | None, split: str, hub_id: str) -> tuple[list[dict], str, str | None]:
    """Local file, local folder (split file found by name) or a Hub dataset id."""
    source = str(source or hub_id)
    path = Path(source).expanduser()
    if path.exists():
        file = find_split_file(path, split) if path.is_dir() else path
        return read_records(file), str(file), file_sha256(file)
    if source.count("/") != 1:
        raise DataError(f"data source {source!r} is neither a local file or folder nor a Hub dataset id")
    try:
        from datasets import load_dataset

        dataset = load_dataset(source, split=split)
    except Exception as exc:
        raise DataError(f"could not load {source} [{split}] from the Hub ({type(exc).__name__}); "
                        "pass a local folder of jsonl/csv files instead") from None
    return [dict(r) for r in dataset], f"{source}@{getattr(dataset, '_fingerprint', '')}", None


def load_dialogsum(source: str | Path | None = None, split: str = "train") -> tuple[list[dict], DataReport]:
    """DialogSum rows as {"id", "dialogue", "summaries": [...], "topic"}.

    Test items of the original release carry summary1..summary3: all become references
    (the Hub split keeps only one per row).
    """
    records, origin, sha = _load_records(source, split, DIALOGSUM_HUB_ID)
    report = DataReport(origin, split, rows_read=len(records), sha256=sha)
    if not records:
        raise DataError(f"{origin} has no rows")
    if not any("dialogue" in r for r in records):
        raise DataError(f"{origin}: no row has the field 'dialogue' (fields seen: {', '.join(sorted(records[0]))})")
    rows = []
    for index, record in enumerate(records):
        dialogue = str(record.get("dialogue") or "").strip()
        keys = ["summary"] + [f"summary{i}" for i in range(1, 10)]
        summaries = [str(record[k]).strip() for k in keys if record.get(k) and str(record[k]).strip()]
        if not dialogue:
            report.bad["missing or empty 'dialogue'"] += 1
            continue
        if not summaries:
            report.bad["missing or empty 'summary'"] += 1
            continue
        rows.append({"id": str(record.get("fname") or record.get("id") or f"{split}_{index}"),
                     "dialogue": dialogue, "summaries": summaries,
                     "topic": str(record.get("topic") or record.get("topic1") or "")})
    report.rows_kept = len(rows)
    if not rows:
        raise DataError(f"{origin}: no usable rows ({report.summary()})")
    return rows, report
