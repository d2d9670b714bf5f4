"""The transformers backend: one base model in this process with named peft adapters.

The reference backend, and the one training and bitsandbytes (4-/8-bit phi-2) use.
peft's adapter switches (set_adapter, disable_adapter, the adapter_names hooks, the row
mask's hooks) change modules every caller shares, so every model call holds `self.lock`.
Concurrent `generate` calls are micro-batched: rows that arrive while the model is
busy run together in the next batch (base rows beside one adapter's through a row mask on
the adapter's update, other mixes through peft's `adapter_names`), so N users cost about
one batch instead of N turns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from phisum.startup import frozen_imports

with frozen_imports():  # the model stack's import-time objects, out of the collector's reach
    import torch
    from transformers import PreTrainedModel, StoppingCriteriaList, TextIteratorStreamer
    from transformers.cache_utils import DynamicCache

from phisum.adapters import (AdapterError, AdapterSource, adapter_display, check_adapter, describe_adapter,
                             resolve_adapter)
from phisum.backends.base import Backend, gather
from phisum.backends.batching import MicroBatcher
from phisum.backends.kv_cache import as_dynamic, buffered_cache
from phisum.backends.lora_state import bf16_copies, masked_by_row, plain_lora_layers, swapped_in
from phisum.backends.stopping import CancelOnEvent, LeaveEarly, RowClock, StopOnStrings
from phisum.generation import BASE, Generation, GenerationSettings, first_stop, held_back
from phisum.models import load_base, pack_linear_weights, use_cpu_attention
from phisum.openmp import release_pool
from phisum.profiles import Profile

log = logging.getLogger(__name__)


class TransformersBackend(Backend):
    name = "transformers"
    max_concurrency = 8  # events queue into the micro-batcher; more only lengthens each batch
    # rows per batch: every running event's before/after pair fits in one (two rows per event)
    default_batch_size = 2 * max_concurrency
    prefill_group = 4  # rows per prefill forward (one system, similar lengths); 0: generate prefills the batch
    leave_early = True  # finished rows leave the batch (False: one generate call runs every row to the end)
    mask_one_adapter = True  # base rows beside one adapter's: mask its update by row (False: peft's adapter_names)
    buffer_kv = True  # decode appends into a buffered KV cache (False: transformers' torch.cat every step)
    release_openmp = True  # hand back a thread's OpenMP pool after loading and after each batch (see phisum.openmp)
    lora_prefill_bf16 = True  # prefill adapter rows with bf16 copies of fp32 LoRA weights beside a bf16 base
    cpu_attention = True  # grouped-query attention in the CPU kernel's fast layout (see models.use_cpu_attention)

    def __init__(self, model: PreTrainedModel, tokenizer, profile: Profile, reason: str = "",
                 batch_size: int | None = None):
        super().__init__(profile, reason)
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size or self.default_batch_size
        self.lock = threading.Lock()
        self.packed_layers = 0
        self._plain_layers: dict[str, list] = {}  # adapter -> its LoRA layers if all plain (see lora_state)
        self._bf16_lora: dict[str, list] = {}  # adapter -> (param, fp32 data, bf16 copy) (see _adapter_in_base_dtype)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # so no later call needs to change shared state (see encode)
            backend.no_padding()
            backend.no_truncation()
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id]
        self.eos_ids = {int(e) for e in eos if e is not None} | {int(tokenizer.eos_token_id)}
        self._batcher = MicroBatcher(self._run_rows)

    # ------------------------------------------------------------ building
    @classmethod
    def load(cls, profile: Profile, adapters: Mapping[str, str] | None = None, reason: str = "",
             dtype=None, bits: int | None = None, fast_cpu: bool = True, progress: bool = True,
             token: str | None = None, batch_size: int | None = None) -> "TransformersBackend":
        """Load the base once and every adapter in `adapters` (name -> folder or Hub id).

        Adapters that are missing or unusable are recorded in `missing` with the reason,
        so the app can say so instead of failing to start."""
        model, tokenizer = load_base(profile, dtype=dtype, bits=bits, progress=progress)
        backend = cls(model, tokenizer, profile, reason, batch_size=batch_size)
        if fast_cpu and bits is None and profile.pack_cpu_linears:
            # Before peft wraps the layers: LoRA A/B stay plain, base layers get packed.
            backend.packed_layers = pack_linear_weights(model)
        if fast_cpu and backend.cpu_attention:
            use_cpu_attention(model)
        for name, spec in (adapters or {}).items():
            try:
                backend.add_adapter(name, spec, token=token)
            except AdapterError as exc:
                backend.missing[name] = str(exc)
                log.warning("%s", exc)
        if backend.release_openmp:
            release_pool()  # the loading thread is rarely the one that runs the model
        return backend

    def add_adapter(self, name: str, spec, token: str | None = None) -> None:
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
            except Exception as exc:  # safetensors' own errors, shape mismatches, bad configs: never fatal
                if isinstance(self.model, PeftModel) and name in self.model.peft_config:
                    self.model.delete_adapter(name)  # peft injected its layers before the weights failed
                first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                raise AdapterError(f"{name}: {adapter_display(str(path))} cannot be loaded on "
                                   f"{self.profile.base_model} ({type(exc).__name__}: {first})") from None
            self.model.eval()
        self.adapters[name] = adapter_display(str(path))
        self.paths[name] = path
        self._plain_layers.pop(name, None)
        self._bf16_lora.pop(name, None)
        self.missing.pop(name, None)

    # ------------------------------------------------------------ queries
    @property
    def context_length(self) -> int:
        return self.profile.context_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    def describe(self) -> dict:
        info = super().describe()
        info.update(device=str(self.device), dtype=str(self.dtype).replace("torch.", ""),
                    packed_linear_layers=self.packed_layers,
                    adapter_details={n: {"source": self.adapters[n], **describe_adapter(p)}
                                     for n, p in self.paths.items()})
        return info

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------ generation
    def generate(self, prompts, systems=BASE, settings=None, stops=(), batch_size=None) -> list[Generation]:
        return gather(self._submit(prompts, systems, settings, stops, batch_size), len(prompts))

    def generate_as_ready(self, prompts, systems=BASE, settings=None, stops=()):
        """Rows that leave their batch early (an adapter's short summary beside the base model's
        long one) come back before the batch ends; the rest with it (see MicroBatcher)."""
        yield from self._submit(prompts, systems, settings, stops)

    def _submit(self, prompts, systems, settings, stops, batch_size=None):
        systems = self._systems_for(prompts, systems)  # here: a bad call fails before any row is queued
        return self._batcher.submit_as_ready(list(zip(prompts, systems)), settings or GenerationSettings(),
                                             tuple(stops), batch_size or self.batch_size)

    def _run_rows(self, rows, settings, stops, on_done=None) -> list[Generation]:
        prompts, systems = [p for p, _ in rows], [s for _, s in rows]
        try:
            with self.lock:
                if len(set(systems)) == 1 or all(self._plain_lora_layers(n) for n in set(systems) - {BASE}):
                    return self._generate_locked(prompts, systems, settings, stops, on_done=on_done)
                # peft routes rows to DoRA and other LoRA variants one batch at a time only
                results = [None] * len(rows)
                for system in dict.fromkeys(systems):
                    index = [i for i, s in enumerate(systems) if s == system]
                    heard = on_done and (lambda j, out, index=index: on_done(index[j], out))
                    outputs = self._generate_locked([prompts[i] for i in index], [system] * len(index), settings,
                                                    stops, on_done=heard)
                    for i, out in zip(index, outputs):
                        results[i] = out
                return results
        finally:
            if self.release_openmp:
                release_pool()  # so a chat's streaming thread, or the next batcher thread, has the only pool

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Left-padded input_ids and attention_mask for a batch of prompts.

        Pads here instead of tokenizer(..., padding=True): that call switches padding
        on in the Rust tokenizer every thread shares, and a concurrent unpadded call
        (prompts are built outside the model lock) switches it off mid-batch, failing
        with "Unable to create tensor". Unpadded calls leave the tokenizer's state alone,
        so none needs a lock."""
        return self._pad(self.tokenizer(list(texts)).input_ids)

    def _pad(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return {"input_ids": ids, "attention_mask": mask}

    def _prefill(self, rows: Sequence[Sequence[int]], systems, room: int) -> DynamicCache | None:
        """The KV cache of every prompt but its last token, left-padded as `_pad` pads the rows,
        with room for `room` more tokens (see `kv_cache`).

        A batch of different dialogues padded to the longest spends much of its prefill on
        padding, and mixing adapters in one forward costs more again. So rows are prefilled in
        small groups of one system and similar length, and the groups' caches are stacked into
        the one cache generate continues from (it computes the last prompt token itself). None
        where a cache cannot be stacked this way; generate then prefills."""
        if self.prefill_group < 1 or min(map(len, rows)) < 2:
            return None
        merged = buffered_cache(self.model.config)
        if merged is None:
            return None
        order = sorted(range(len(rows)), key=lambda i: (systems[i], len(rows[i])))
        groups: list[list[int]] = []
        for i in order:
            if groups and len(groups[-1]) < self.prefill_group and systems[groups[-1][0]] == systems[i]:
                groups[-1].append(i)
            else:
                groups.append([i])
        parts = {}
        for group in groups:
            enc = self._pad([rows[i][:-1] for i in group])
            cache = DynamicCache(config=self.model.config)
            system = systems[group[0]]
            with self._adapters_for([system]) as extra, self._adapter_in_base_dtype(system):
                self.model(**enc, position_ids=(enc["attention_mask"].cumsum(-1) - 1).clamp(min=0),
                           past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
            parts.update((row, (cache, j)) for j, row in enumerate(group))
        for index, layer in enumerate(merged.layers):
            keys = [parts[row][0].layers[index].keys[parts[row][1]] for row in range(len(rows))]
            values = [parts[row][0].layers[index].values[parts[row][1]] for row in range(len(rows))]
            layer.lazy_initialization(keys[0][None], values[0][None])
            layer.hold_rows(keys, values, room)  # a sliding layer keeps at most its window
            if layer.is_sliding:
                layer.cumulative_length = max(map(len, rows)) - 1
        return merged if self.buffer_kv else as_dynamic(merged)

    def _adapter_in_base_dtype(self, system):
        """Prefill an adapter's rows with its LoRA weights in the base's bf16 (CPU only).

        peft keeps adapter weights in fp32 beside a bf16 base, so each LoRA layer casts a
        prompt's activations to fp32, multiplies in fp32 and adds back: a large share of an
        adapter's prefill on a CPU. Prefill runs on bf16 copies of the weights, swapped in for
        the call. Decode keeps fp32: a step's few rows multiply faster in fp32 there
        (benchmarks/batch_generation.py measures both, `grouped-fp32-lora`). Not tried on GPUs."""
        if not self.lora_prefill_bf16 or system == BASE or self.device.type != "cpu":
            return swapped_in([])
        if system not in self._bf16_lora:
            self._bf16_lora[system] = bf16_copies(self._plain_lora_layers(system), system)
        return swapped_in(self._bf16_lora[system])

    def _generate_locked(self, batch, systems, settings, stops, cancel=None, on_done=None) -> list[Generation]:
        """Generate for every row from a grouped prefill (`_prefill`); rows leave as they finish.

        transformers' generate keeps a finished row in the batch, padding, until the last row
        is done: in a before/after batch the adapter's summaries end long before the base
        model's reach their cap, and every step still pays for them (and for mixing adapters
        in one batch). So generate stops when a row is done, the finished rows are dropped
        from the sequences and the KV cache (`Cache.batch_select_indices`), and generation
        continues from the cache for the rest: no token is computed twice. `on_done(row, Generation)`
        hears of each row that leaves while others go on."""
        tokens = self.tokenizer(list(batch)).input_ids
        enc = self._pad(tokens)
        prompt_len = enc["input_ids"].shape[1]
        clock = RowClock(self.tokenizer, self.eos_ids, stops, prompt_len, len(batch))
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        with torch.inference_mode():
            cache = self._prefill(tokens, systems, room=settings.max_new_tokens + 1)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        alive, results = list(range(len(batch))), {}

        def finish(row, new_ids, end):
            prompt_tokens = int(enc["attention_mask"][row].sum())
            return self._finish(new_ids, systems[row], prompt_tokens, stops, settings.max_new_tokens,
                                clock.seconds(row, end), cancel)

        while alive:
            left = settings.max_new_tokens - (ids.shape[1] - prompt_len)
            criteria = StoppingCriteriaList([LeaveEarly(clock) if self.leave_early else clock])
            if cancel is not None:
                criteria.append(CancelOnEvent(cancel))
            kwargs = {**settings.generate_kwargs(), "max_new_tokens": left}
            with torch.inference_mode(), self._adapters_for([systems[i] for i in alive]) as extra:
                out = self.model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **kwargs,
                                          **extra, stopping_criteria=criteria, return_dict_in_generate=True,
                                          pad_token_id=self.tokenizer.pad_token_id)
            steps = out.sequences.shape[1] - ids.shape[1]
            over = steps >= left or (cancel is not None and cancel.is_set())
            keep = [] if over else [j for j, row in enumerate(alive) if row not in clock.finished]
            for j, row in enumerate(alive):
                if j not in keep:
                    results[row] = finish(row, out.sequences[j, prompt_len:], time.perf_counter())
                    if keep and on_done is not None:
                        on_done(row, results[row])
            if not keep:
                break
            cache = out.past_key_values
            cache.batch_select_indices(torch.tensor(keep, device=ids.device))
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], steps)], dim=1)[keep]
            ids, alive = out.sequences[keep], [alive[j] for j in keep]
            clock.rows = alive
        return [results[row] for row in range(len(batch))]

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
        elif (self.mask_one_adapter and len(names - {BASE}) == 1
              and (layers := self._plain_lora_layers(next(iter(names - {BASE}))))):
            with masked_by_row(self.model, layers, systems):
                yield {}
        else:  # one batch, one adapter per row
            yield {"adapter_names": ["__base__" if s == BASE else s for s in systems]}

    def _plain_lora_layers(self, name: str) -> list:
        if name not in self._plain_layers:
            self._plain_layers[name] = plain_lora_layers(self.model, name)
        return self._plain_layers[name]

    def stream(self, prompt, system, settings, stops=(), cancel=None) -> Iterator[str]:
        self.require(system)
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
