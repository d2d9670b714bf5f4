"""Generation settings, results, input checks and stop-string rules every backend shares."""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass, field

BASE = "base"  # the system name of the base model with every adapter off
MAX_NEW_TOKENS_LIMIT = 1024


class InputError(ValueError):
    """Input the user can fix: the message is shown to them as is."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    do_sample: bool = False  # greedy by default: reproducible, and what ROUGE reports use
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self, context_length: int) -> "GenerationSettings":
        limit = min(MAX_NEW_TOKENS_LIMIT, context_length // 2)
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= limit:
            raise InputError(f"max new tokens must be between 1 and {limit}, got {self.max_new_tokens}")
        if self.do_sample:
            if not 0.0 < float(self.temperature) <= 2.0:
                raise InputError(f"temperature must be in (0, 2], got {self.temperature}")
            if not 0.0 < float(self.top_p) <= 1.0:
                raise InputError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 1.0 <= float(self.repetition_penalty) <= 2.0:
            raise InputError(f"repetition penalty must be in [1, 2], got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**32):
            raise InputError(f"seed must be a whole number from 0 to 2**32 - 1, got {self.seed}")
        return self

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p), top_k=0)
        else:  # silence generation_config defaults that only apply to sampling
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = float(self.repetition_penalty)
        return kwargs

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    text: str
    system: str
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # eos | stop | length | cancelled
    seconds: float = 0.0
    notices: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.text.strip()

    @property
    def display(self) -> str:
        if self.empty:
            return "(empty output: the model produced no text before stopping)"
        return self.text

    def to_dict(self) -> dict:
        return {**asdict(self), "empty": self.empty}


def validate_text(value, what: str = "dialogue") -> str:
    """Reject what is not usable text; return it with outer whitespace removed."""
    if isinstance(value, bytes):
        raise InputError(f"the {what} must be text, not bytes; decode it as UTF-8 first")
    if not isinstance(value, str):
        raise InputError(f"the {what} must be text, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise InputError(f"the {what} is empty: paste some text first")
    if "\x00" in text:
        raise InputError(f"the {what} contains NUL bytes and looks like binary data, not text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone UTF-16 surrogate from a JSON client: not text a tokenizer takes
        raise InputError(f"the {what} contains invalid Unicode (a lone surrogate at character {exc.start}); "
                         "send valid UTF-8 text") from None
    sample = text[:20000]
    control = sum(1 for ch in sample if unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") and ch not in "\n\r\t")
    if control > max(3, len(sample) // 50):
        raise InputError(f"the {what} looks like binary data ({control} control characters); expected plain text")
    return text


def first_stop(text: str, stops) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def held_back(text: str, stops) -> int:
    """Length of a trailing fragment that could be the start of a stop string.

    A stream must not show `### Hu` and then take it back.
    """
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = max(keep, n)
                break
    return keep
