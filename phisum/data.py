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


def load_dialogsum(source: str | Path | None = None, split: str = "train", **_) -> tuple[list[dict], DataReport]:
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


# ------------------------------------------------------------------ oasst1

OASST_HUB_ID = "OpenAssistant/oasst1"
XSUM_HUB_ID = "EdinburghNLP/xsum"


def _oasst_rank(message: dict) -> float:
    rank = message.get("rank")
    return float("inf") if rank is None else float(rank)


def build_oasst_conversations(messages: list[dict], lang: str | None = "en",
                              report: DataReport | None = None) -> list[dict]:
    """Rebuild one conversation per message tree from oasst1's flat message rows.

    Deleted messages and ones reviewers rejected (review_result false) are dropped
    with their whole subtree; from each kept node the best-ranked reply (rank 0, the
    lowest rank, first on a tie) is followed down to a leaf. Returns
    [{"tree_id", "lang", "messages": [{"role": "user"|"assistant", "content"}]}].
    """
    report = report or DataReport("oasst1", "?")
    nodes: dict[str, dict] = {}
    for message in messages:
        mid, role, text = message.get("message_id"), message.get("role"), str(message.get("text") or "").strip()
        if not mid or role not in ("prompter", "assistant"):
            report.bad["message without message_id or role"] += 1
        elif not text:
            report.bad["empty message text"] += 1
        elif message.get("deleted"):
            report.bad["deleted message"] += 1
        elif message.get("review_result") is False:
            report.bad["message rejected in review"] += 1
        else:
            nodes[mid] = message
    children: dict[str, list[dict]] = {}
    roots = []
    for message in nodes.values():
        parent = message.get("parent_id")
        if parent is None:
            roots.append(message)
        elif parent in nodes:
            children.setdefault(parent, []).append(message)
        else:
            report.bad["reply whose parent was dropped or is missing"] += 1
    conversations = []
    for root in roots:
        if lang and root.get("lang") != lang:
            report.bad[f"tree not in language {lang!r}"] += 1
            continue
        if root["role"] != "prompter":
            report.bad["tree that does not start with a prompter message"] += 1
            continue
        path, node = [root], root
        while True:
            # Replies must alternate roles; a same-role child would break the template.
            replies = [c for c in children.get(node["message_id"], []) if c["role"] != node["role"]]
            if not replies:
                break
            node = min(replies, key=_oasst_rank)  # min keeps the first of equal ranks
            path.append(node)
        while path and path[-1]["role"] != "assistant":
            path.pop()  # a training conversation ends with an assistant reply
        if len(path) < 2:
            report.bad["tree without a kept assistant reply"] += 1
            continue
        conversations.append({
            "tree_id": str(root.get("message_tree_id") or root["message_id"]),
            "lang": root.get("lang"),
            "messages": [{"role": "user" if m["role"] == "prompter" else "assistant", "content": m["text"].strip()}
                         for m in path],
        })
    report.rows_kept = len(conversations)
    return conversations


def load_oasst(source: str | Path | None = None, split: str = "train",
               lang: str | None = "en", **_) -> tuple[list[dict], DataReport]:
    """oasst1 conversations from the Hub or a local jsonl of raw message rows.

    rows_read counts messages; rows_kept counts conversations (one per tree).
    """
    records, origin, sha = _load_records(source, split, OASST_HUB_ID)
    report = DataReport(origin, split, rows_read=len(records), sha256=sha)
    if records and "message_id" not in records[0]:
        raise DataError(f"{origin}: expected raw oasst1 message rows with 'message_id', 'parent_id', 'role', "
                        f"'text' (fields seen: {', '.join(sorted(records[0]))})")
    conversations = build_oasst_conversations(records, lang=lang, report=report)
    if not conversations:
        raise DataError(f"{origin}: no usable conversations ({report.summary()})")
    return conversations, report


def split_by_key(rows: list[dict], eval_fraction: float = 0.1, key: str = "id",
                 seed: str = "phisum") -> tuple[list[dict], list[dict]]:
    """Deterministic (train, eval) split on a hash of each row's `key`: the same row always
    lands on the same side, whatever the order or size of the file."""
    train, evaluation = [], []
    for index, row in enumerate(rows):
        digest = hashlib.sha256(f"{seed}:{row.get(key, index)}".encode()).digest()
        (evaluation if int.from_bytes(digest[:4], "big") / 2**32 < eval_fraction else train).append(row)
    return train, evaluation


def split_by_tree(conversations: list[dict], eval_fraction: float = 0.1,
                  seed: str = "phisum") -> tuple[list[dict], list[dict]]:
    """Split on the tree id, so a tree's conversations never land in both parts."""
    return split_by_key(conversations, eval_fraction, "tree_id", seed)


# -------------------------------------------------------------------- xsum

def load_xsum(source: str | Path | None = None, split: str = "train", **_) -> tuple[list[dict], DataReport]:
    """XSum rows as {"id", "document", "summary"}."""
    records, origin, sha = _load_records(source, split, XSUM_HUB_ID)
    report = DataReport(origin, split, rows_read=len(records), sha256=sha)
    rows = []
    for index, record in enumerate(records):
        document = str(record.get("document") or "").strip()
        summary = str(record.get("summary") or "").strip()
        if not document:
            report.bad["missing or empty 'document'"] += 1
        elif not summary:
            report.bad["missing or empty 'summary'"] += 1
        else:
            rows.append({"id": str(record.get("id") or f"{split}_{index}"), "document": document, "summary": summary})
    report.rows_kept = len(rows)
    if not rows:
        raise DataError(f"{origin}: no usable rows ({report.summary()})")
    return rows, report


# ------------------------------------------------ rows -> prompt/completion (see also tasks.Task.examples)

def with_eos(text: str, eos_token: str) -> str:
    # The model must learn to stop: every target ends with EOS, and EOS is in the loss.
    return text if text.endswith(eos_token) else text + eos_token


def chat_examples(conversations: list[dict], eos_token: str, every_turn: bool = True) -> list[dict]:
    """`### Human: ... ### Assistant:` prompt, the reply as completion.

    every_turn makes one example per assistant reply (each with its history), so
    every reply of a conversation is trained on, not only the last.
    """
    from phisum.prompts import split_chat_for_training

    examples = []
    for conversation in conversations:
        messages = conversation["messages"]
        ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
        for end in ends if every_turn else ends[-1:]:
            prompt, completion = split_chat_for_training(messages[:end])
            examples.append({"prompt": prompt, "completion": with_eos(completion, eos_token)})
    return examples
