"""Stopping rules for the transformers backend's generate calls (per row, per batch, on cancel)."""

from __future__ import annotations

import threading
import time

import torch
from transformers import StoppingCriteria

from phisum.generation import first_stop


class RowClock(StoppingCriteria):
    """Marks each row finished at its EOS or stop string and records when, so a row that
    finished early reports its own time, not the batch's. Stops the batch when all are done.
    `rows` maps the current batch's rows to the first batch's (rows leave as they finish).

    transformers' own stop_strings pre-computes tables over the whole vocabulary (262k
    tokens for Gemma); decoding a short tail per step is cheaper here."""

    def __init__(self, tokenizer, eos_ids, stops, prompt_length: int, rows: int, tail_tokens: int = 12):
        self.tokenizer, self.eos_ids, self.stops = tokenizer, list(eos_ids), tuple(stops)
        self.prompt_length, self.tail = prompt_length, tail_tokens
        self.start = time.perf_counter()
        self.finished: dict[int, float] = {}
        self.rows = list(range(rows))

    def __call__(self, input_ids, scores, **kwargs):
        new = input_ids[:, self.prompt_length:]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if new.shape[1] == 0:
            return done
        done |= torch.isin(new, torch.tensor(self.eos_ids, device=new.device)).any(dim=1)
        if self.stops:
            tails = self.tokenizer.batch_decode(new[:, -self.tail:], skip_special_tokens=True)
            done |= torch.tensor([first_stop(t, self.stops) >= 0 for t in tails], device=new.device)
        now = time.perf_counter()
        for row in done.nonzero().flatten().tolist():
            self.finished.setdefault(self.rows[row], now - self.start)
        return done

    def seconds(self, row: int, end: float) -> float:
        return self.finished.get(row, end - self.start)


class LeaveEarly(StoppingCriteria):
    """The clock's per-row stops, and the whole call as soon as a row is done while others
    still run, so the caller can drop the finished rows and go on without them."""

    def __init__(self, clock: RowClock):
        self.clock = clock

    def __call__(self, input_ids, scores, **kwargs):
        done = self.clock(input_ids, scores)
        if 0 < int(done.sum()) < done.shape[0]:
            return torch.ones_like(done)
        return done


class StopOnStrings(StoppingCriteria):
    """Per-row stop when the newly generated text contains a stop string (streaming)."""

    def __init__(self, tokenizer, stops, prompt_length: int, tail_tokens: int = 12):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.prompt_length, self.tail = prompt_length, tail_tokens

    def __call__(self, input_ids, scores, **kwargs):
        new = input_ids[:, self.prompt_length:]
        if not self.stops or new.shape[1] == 0:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tails = self.tokenizer.batch_decode(new[:, -self.tail:], skip_special_tokens=True)
        done = [first_stop(t, self.stops) >= 0 for t in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class CancelOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
