"""The one inference engine: a base model with named peft adapters.

The app, the CLI, evaluation and the benchmarks all generate through this class.
peft's adapter switches (set_adapter, disable_adapter, adapter_names hooks)
change modules shared by every caller, so every model call holds `self.lock`.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from phisum.startup import frozen_imports

with frozen_imports():
    import torch
    from transformers import PreTrainedModel, StoppingCriteriaList, TextIteratorStreamer

from phisum import prompts
from phisum.adapters import AdapterError, AdapterSource, check_adapter, describe_adapter, resolve_adapter
from phisum.generation import (BASE, CancelOnEvent, Generation, GenerationSettings, InputError, StopOnStrings,
                               first_stop, held_back, validate_text)
from phisum.models import load_base, pack_linear_weights
from phisum.profiles import Profile, resolve_profile

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: PreTrainedModel, tokenizer, profile: Profile, reason: str = ""):
        self.model, self.tokenizer, self.profile, self.reason = model, tokenizer, profile, reason
        self.lock = threading.Lock()
        self.adapters: dict[str, Path] = {}
        self.missing: dict[str, str] = {}  # adapter name -> why it is not loaded
        self.packed_layers = 0
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # so no later call needs to change shared state (see encode)
            backend.no_padding()
            backend.no_truncation()
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id]
        self.eos_ids = {int(e) for e in eos if e is not None} | {int(tokenizer.eos_token_id)}

    # ------------------------------------------------------------ building
    @classmethod
    def load(cls, profile: str | Profile | None = None, adapters: Mapping[str, str] | None = None,
             dtype=None, bits: int | None = None, fast_cpu: bool = True, progress: bool = True,
             token: str | None = None) -> "Engine":
        """Load the base once and every adapter the profile (or `adapters`) names.

        Adapters that are missing or unusable are recorded in `engine.missing`
        with the reason, so the app can say so instead of failing to start.
        """
        if isinstance(profile, Profile):
            reason = f"profile {profile.name!r} given"
        else:
            profile, reason = resolve_profile(profile)
        log.info(reason)
        model, tokenizer = load_base(profile, dtype=dtype, bits=bits, progress=progress)
        engine = cls(model, tokenizer, profile, reason)
        if fast_cpu and bits is None:
            # Before peft wraps the layers: LoRA A/B stay plain, base layers get packed.
            engine.packed_layers = pack_linear_weights(model)
        sources = profile.adapter_sources() if adapters is None else dict(adapters)
        for name, spec in sources.items():
            try:
                engine.add_adapter(name, spec, token=token)
            except AdapterError as exc:
                engine.missing[name] = str(exc)
                log.warning("%s", exc)
        return engine

    def add_adapter(self, name: str, spec: str | Path, token: str | None = None) -> None:
        if name == BASE or name.startswith("__"):
            raise AdapterError(f"{name!r} is reserved; choose another adapter name")
        path = resolve_adapter(AdapterSource.parse(name, str(spec)), token=token)
        check_adapter(path, self.profile, name)
        from peft import PeftModel

        with self.lock:
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name,
                                                           is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise AdapterError(f"{name}: {path} does not fit {self.profile.base_model} "
                                   f"({str(exc).splitlines()[0][:200]})") from None
            self.model.eval()
        self.adapters[name] = path
        self.missing.pop(name, None)

    # ------------------------------------------------------------ queries
    @property
    def systems(self) -> list[str]:
        return [BASE, *self.adapters]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    def info(self) -> dict:
        return {
            "profile": self.profile.name,
            "why": self.reason,
            "base_model": self.profile.base_model,
            "description": self.profile.description,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "context_length": self.profile.context_length,
            "adapters": {n: {"path": str(p), **describe_adapter(p)} for n, p in self.adapters.items()},
            "missing_adapters": dict(self.missing),
            "packed_linear_layers": self.packed_layers,
        }

    def require(self, system: str) -> None:
        if system == BASE or system in self.adapters:
            return
        why = self.missing.get(system, f"no adapter named {system!r} is configured")
        raise InputError(f"adapter {system!r} is not available: {why}")

    # ------------------------------------------------------------ prompts
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def fit_text(self, task: str, text: str, max_new_tokens: int) -> tuple[str, list[str]]:
        """Build the task prompt; cut the input from the front if it exceeds the context."""
        text = validate_text(text, "article" if task == "xsum" else "dialogue" if task == "dialogsum" else "message")
        overhead = self.count_tokens(prompts.build_prompt(task, "")) + 4
        budget = self.profile.context_length - max_new_tokens - overhead
        notices = []
        # Character pre-cut keeps tokenizing a pasted book cheap; tokens decide below.
        chars = text[-budget * 16:] if len(text) > budget * 16 else text
        ids = self.tokenizer(chars, add_special_tokens=False).input_ids
        if len(ids) > budget or chars is not text:
            kept = self.tokenizer.decode(ids[-budget:], skip_special_tokens=True)
            line = kept.find("\n")
            if 0 <= line < len(kept) // 4:  # start on a whole turn when one is near
                kept = kept[line + 1:]
            total = self.count_tokens(text) if len(text) < 400_000 else f"about {len(text) // 4}"
            notices.append(f"Input truncated: it was {total} tokens; kept the last {self.count_tokens(kept)} "
                           f"tokens so prompt plus {max_new_tokens} new tokens fit the "
                           f"{self.profile.context_length}-token context.")
            text = kept
        return prompts.build_prompt(task, text), notices

    def fit_chat(self, messages: Sequence[Mapping], max_new_tokens: int) -> tuple[str, list[str]]:
        """Chat prompt; drop the oldest turns when the history outgrows the context."""
        if not messages or messages[-1].get("role") != "user":
            raise InputError("the conversation must end with a user message")
        last = dict(messages[-1])
        last["content"] = validate_text(prompts.message_text(last), "message")
        history = [m for m in messages[:-1] if m.get("role") in ("user", "assistant")]
        budget = self.profile.context_length - max_new_tokens
        notices = []
        while True:
            prompt = prompts.chat_prompt([*history, last])
            if self.count_tokens(prompt) <= budget:
                break
            if history:
                history = history[2:] if len(history) > 1 else []
                continue
            cut, more = self.fit_text("chat", last["content"], max_new_tokens)
            notices.extend(more)
            return cut, notices + ["Earlier turns were dropped to fit the context."] * bool(messages[:-1])
        if len(history) < len([m for m in messages[:-1] if m.get("role") in ("user", "assistant")]):
            notices.append("The oldest turns were dropped to fit the context.")
        return prompt, notices

    # ------------------------------------------------------------ generation
    def generate(self, prompt_list: Sequence[str], systems: str | Sequence[str] = BASE,
                 settings: GenerationSettings | None = None, stops: Sequence[str] = (),
                 batch_size: int = 8) -> list[Generation]:
        """Generate for already-built prompts; `systems` is one name or one per prompt.

        Mixed systems run in one batch through peft's `adapter_names`.
        """
        settings = (settings or GenerationSettings()).validate(self.profile.context_length)
        systems = [systems] * len(prompt_list) if isinstance(systems, str) else list(systems)
        if len(systems) != len(prompt_list):
            raise ValueError("one system per prompt")
        for system in set(systems):
            self.require(system)
        results: list[Generation] = []
        for start in range(0, len(prompt_list), batch_size):
            chunk = slice(start, start + batch_size)
            with self.lock:
                results.extend(self._generate_locked(list(prompt_list[chunk]), systems[chunk], settings, stops))
        return results

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Left-padded input_ids and attention_mask for a batch of prompts.

        Pads here instead of tokenizer(..., padding=True): that call switches padding
        on in the Rust tokenizer every thread shares, and a concurrent unpadded call
        (prompts are built outside the model lock) switches it off mid-batch, failing
        with "Unable to create tensor" (7 of 40 batches in a 3-thread stress run).
        Unpadded calls leave the tokenizer's state alone, so none needs a lock."""
        rows = self.tokenizer(list(texts)).input_ids
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return {"input_ids": ids, "attention_mask": mask}

    def _generate_locked(self, batch, systems, settings, stops, cancel=None) -> list[Generation]:
        enc = self.encode(batch)
        prompt_len = enc["input_ids"].shape[1]
        criteria = StoppingCriteriaList([StopOnStrings(self.tokenizer, stops, prompt_len)] if stops else [])
        if cancel is not None:
            criteria.append(CancelOnEvent(cancel))
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        t0 = time.perf_counter()
        with torch.inference_mode(), self._adapters_for(systems) as extra:
            out = self.model.generate(**enc, **settings.generate_kwargs(), **extra, stopping_criteria=criteria,
                                      pad_token_id=self.tokenizer.pad_token_id)
        seconds = time.perf_counter() - t0
        results = []
        for row, system in enumerate(systems):
            prompt_tokens = int(enc["attention_mask"][row].sum())
            results.append(self._finish(out[row, prompt_len:], system, prompt_tokens, stops,
                                        settings.max_new_tokens, seconds, cancel))
        return results

    def _finish(self, new_ids, system, prompt_tokens, stops, max_new, seconds, cancel) -> Generation:
        ids = new_ids.tolist()
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        reason = "eos" if end is not None else "length"
        ids = ids[:end] if end is not None else ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = first_stop(text, stops)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif reason == "length" and len(ids) < max_new:
            reason = "cancelled" if cancel is not None and cancel.is_set() else "stop"
        return Generation(text.strip(), system, prompt_tokens, len(ids), reason, seconds)

    @contextmanager
    def _adapters_for(self, systems):
        """Put the shared model into the state `systems` need; yields extra generate kwargs."""
        names = set(systems)
        if not self.adapters:
            yield {}
        elif names == {BASE}:
            with self.model.disable_adapter():
                yield {}
        elif len(names) == 1:
            self.model.set_adapter(systems[0])
            yield {}
        else:  # one batch, one adapter per row
            yield {"adapter_names": ["__base__" if s == BASE else s for s in systems]}

    # ------------------------------------------------------------ task helpers
    def summarize(self, dialogues: Sequence[str], system: str = "dialogsum",
                  settings: GenerationSettings | None = None, task: str = "dialogsum",
                  batch_size: int = 8) -> list[Generation]:
        settings = settings or GenerationSettings()
        built = [self.fit_text(task, d, settings.max_new_tokens) for d in dialogues]
        outs = self.generate([p for p, _ in built], system, settings, prompts.STOP_STRINGS[task], batch_size)
        for out, (_, notices) in zip(outs, built):
            out.notices.extend(notices)
        return outs

    def compare(self, dialogues: Sequence[str], adapter: str = "dialogsum",
                settings: GenerationSettings | None = None, task: str = "dialogsum",
                batch_size: int = 8) -> list[tuple[Generation, Generation]]:
        """Base and adapter outputs for each input, both rows in ONE generate call."""
        settings = settings or GenerationSettings()
        self.require(adapter)
        built = [self.fit_text(task, d, settings.max_new_tokens) for d in dialogues]
        pairs = []
        half = max(1, batch_size // 2)
        for start in range(0, len(built), half):
            chunk = [p for p, _ in built[start:start + half]]
            outs = self.generate(chunk + chunk, [BASE] * len(chunk) + [adapter] * len(chunk), settings,
                                 prompts.STOP_STRINGS[task], batch_size=len(chunk) * 2)
            for i, (_, notices) in enumerate(built[start:start + half]):
                base, tuned = outs[i], outs[len(chunk) + i]
                base.notices.extend(notices)
                tuned.notices.extend(notices)
                pairs.append((base, tuned))
        return pairs

    def stream_chat(self, messages: Sequence[Mapping], system: str = "oasst",
                    settings: GenerationSettings | None = None,
                    cancel: threading.Event | None = None, notices: list | None = None) -> Iterator[str]:
        """Yield the reply as it grows. Closing the generator stops generation.

        Truncation notices are appended to `notices` when a list is given.
        """
        settings = (settings or GenerationSettings(max_new_tokens=256)).validate(self.profile.context_length)
        self.require(system)
        prompt, found = self.fit_chat(messages, settings.max_new_tokens)
        if notices is not None:
            notices.extend(found)
        yield from self.stream(prompt, system, settings, prompts.STOP_STRINGS["chat"], cancel)

    def stream(self, prompt: str, system: str, settings: GenerationSettings, stops: Sequence[str] = (),
               cancel: threading.Event | None = None) -> Iterator[str]:
        cancel = cancel or threading.Event()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        enc = self.encode([prompt])
        criteria = StoppingCriteriaList([CancelOnEvent(cancel)])
        if stops:
            criteria.append(StopOnStrings(self.tokenizer, stops, enc["input_ids"].shape[1]))
        errors = []

        def work():
            try:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                with torch.inference_mode(), self._adapters_for([system]) as extra:
                    self.model.generate(**enc, **settings.generate_kwargs(), **extra, streamer=streamer,
                                        stopping_criteria=criteria, pad_token_id=self.tokenizer.pad_token_id)
            except Exception as exc:  # surfaced to the consumer below
                errors.append(exc)
                streamer.on_finalized_text("", stream_end=True)

        with self.lock:
            thread = threading.Thread(target=work, name="phisum-stream", daemon=True)
            thread.start()
            text = ""
            try:
                for piece in streamer:
                    text += piece
                    cut = first_stop(text, stops)
                    if cut >= 0:
                        text = text[:cut]
                        cancel.set()
                        break
                    shown = text[:len(text) - held_back(text, stops)] if stops else text
                    yield shown.strip()
                if not errors:
                    yield text.strip()
            finally:
                cancel.set()  # the consumer left (stop button, closed tab): stop generating
                thread.join()
        if errors:
            raise errors[0]

