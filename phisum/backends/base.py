"""The one backend contract: everything that generates goes through a `Backend`.

A backend serves one base model and named LoRA adapters ("systems": `base` plus
each adapter name). Callers hand it prompts that are already built and fitted
(phisum.inference does that for every task) and settings that were validated once
at the edge (`GenerationSettings.validate`); no backend re-validates. Task
helpers, the app, the CLI, evaluation and the benchmarks hold a `Backend` and
never know which implementation it is:

- transformers: transformers + peft in this process (the reference; training and
  bitsandbytes quantization use it)
- llamacpp:     llama.cpp's server in this process (xllamacpp), adapters as GGUF LoRA files
- openai:       any OpenAI-compatible server (vLLM, llama.cpp's llama-server)
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Iterable, Iterator, Sequence

from phisum.generation import BASE, Generation, GenerationSettings, InputError
from phisum.profiles import Profile


class BackendError(RuntimeError):
    """The backend cannot serve (server unreachable, model missing): a one-line reason."""


class Backend(abc.ABC):
    name: str = "?"
    #: events the app may run at once: the backend batches what arrives together
    max_concurrency: int = 1

    def __init__(self, profile: Profile, reason: str = ""):
        self.profile = profile
        self.reason = reason  # why this profile (and backend) was chosen, for the header and `info`
        self.adapters: dict[str, str] = {}  # adapter name -> where it was loaded from (display-safe)
        self.missing: dict[str, str] = {}  # adapter name -> why it is not loaded
        self.paths: dict = {}  # adapter name -> local folder, where known (reports record its sha256)

    # ------------------------------------------------------------ what it serves
    @property
    def systems(self) -> list[str]:
        return [BASE, *self.adapters]

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Tokens of prompt plus generation one request may use."""

    def require(self, system: str) -> None:
        if system == BASE or system in self.adapters:
            return
        why = self.missing.get(system, f"no adapter named {system!r} is configured")
        raise InputError(f"adapter {system!r} is not available: {why}")

    def describe(self) -> dict:
        """What the header, `info` and reports show: display-safe, no secrets, no absolute paths."""
        return {"backend": self.name, "profile": self.profile.name, "why": self.reason,
                "base_model": self.profile.base_model, "context_length": self.context_length,
                "adapters": dict(self.adapters), "missing_adapters": dict(self.missing),
                "max_concurrency": self.max_concurrency}

    # ------------------------------------------------------------ tokens
    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as the model sees it inside a prompt (no special tokens added)."""

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens dropped."""

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    # ------------------------------------------------------------ generation
    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], systems: str | Sequence[str] = BASE,
                 settings: GenerationSettings | None = None, stops: Sequence[str] = (),
                 batch_size: int | None = None) -> list[Generation]:
        """One Generation per prompt, in order; `systems` is one name or one per prompt.

        Rows may be batched together (also with other callers' rows) however the backend
        can; results never depend on what else was in the batch beyond numerical noise."""

    def generate_as_ready(self, prompts: Sequence[str], systems: str | Sequence[str] = BASE,
                          settings: GenerationSettings | None = None,
                          stops: Sequence[str] = ()) -> Iterator[list[tuple[int, Generation]]]:
        """The rows' (index, Generation) pairs in groups, each group as soon as it is done, so a
        caller can show one result while another is still generating. Here: one `generate` call,
        one group with every row at its end (a backend that batches rows gains nothing by splitting
        them); a backend whose rows finish separately yields each in a group of its own."""
        yield list(enumerate(self.generate(prompts, systems, settings, stops)))

    @abc.abstractmethod
    def stream(self, prompt: str, system: str, settings: GenerationSettings, stops: Sequence[str] = (),
               cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the growing text (stop strings held back until they cannot be one).
        Setting `cancel` or closing the generator stops generation."""

    def close(self) -> None:
        """Release the model or the server connection."""

    # ------------------------------------------------------------ shared checks
    def _systems_for(self, prompts: Sequence[str], systems: str | Sequence[str]) -> list[str]:
        systems = [systems] * len(prompts) if isinstance(systems, str) else list(systems)
        if len(systems) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(systems)} systems: one system per prompt")
        for system in set(systems):
            self.require(system)
        return systems


def gather(groups: Iterable[list[tuple[int, Generation]]], count: int) -> list[Generation]:
    """`generate_as_ready`'s groups back in row order: what `generate` returns."""
    results = [None] * count
    for group in groups:
        for index, generation in group:
            results[index] = generation
    return results


def merge_key(settings: GenerationSettings, stops: Sequence[str]):
    """Requests with equal keys can share a batch: same decoding, and no seed that a
    shared batch would make irreproducible."""
    if settings.do_sample and settings.seed is not None:
        return None  # never merged
    return (tuple(sorted(settings.to_dict().items())), tuple(stops))

