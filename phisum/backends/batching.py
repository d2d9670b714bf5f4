"""Micro-batching for a backend that runs one model call at a time (the transformers backend).

Rows of concurrent `generate` calls that arrive while the model is busy run together in the
next call, so N users cost about one batch instead of N turns. A caller may take its rows as
they finish (`submit_as_ready`): rows that leave the batch early come back before it ends.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from phisum.backends.base import gather, merge_key
from phisum.generation import Generation, GenerationSettings

log = logging.getLogger(__name__)


@dataclass
class _Job:
    rows: list
    key: object
    settings: GenerationSettings
    stops: tuple
    results: list = field(default_factory=list)
    pending: int = 0
    error: BaseException | None = None
    ready: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # (row, Generation) or (None, error)


class MicroBatcher:
    """Runs the rows of concurrent calls together, at most `batch_size` rows per model call.

    Rows wait in one FIFO queue; the worker takes the oldest row and every queued row
    that can share its batch (same decoding settings and stops), in order, so a long
    evaluation and a single click interleave batch by batch instead of the click
    waiting for the whole evaluation.

    While several callers are active (the last batch held rows of more than one call), the
    next batch waits up to `max_wait` seconds for every active caller's rows: the last
    batch's plus those that queued while it ran (the dynamic batcher's queue delay, as in
    Triton). Users whose answers came back together send their next clicks a few hundred
    milliseconds apart through the app; without the wait the first of them runs alone
    while the rest queue behind it for a whole generation, and a caller that missed a
    batch by milliseconds stays out of step, batch after batch. A lone caller never waits."""

    def __init__(self, run_rows, max_wait: float = 0.5):
        self.run_rows = run_rows
        self.max_wait = max_wait
        self.expected = 0  # rows of every active caller when the last batch ended (0: one caller)
        self.queue: deque = deque()  # (job, row index)
        self.cv = threading.Condition()
        self.worker: threading.Thread | None = None

    def submit(self, rows, settings, stops, batch_size) -> list[Generation]:
        return gather(self.submit_as_ready(rows, settings, stops, batch_size), len(rows))

    def submit_as_ready(self, rows, settings, stops, batch_size):
        """Yield [(row index, Generation), ...] as rows finish: those that leave a batch early
        (when `run_rows` reports them), the rest when their batch ends. A call's last row always
        comes with its batch's end, so a caller is never released while its batch still runs."""
        job = _Job(rows, merge_key(settings, stops), settings, stops, [None] * len(rows), len(rows))
        if not rows:
            return
        with self.cv:
            self.queue.extend((job, i, batch_size) for i in range(len(rows)))
            if self.worker is None or not self.worker.is_alive():
                self.worker = threading.Thread(target=self._work, name="phisum-batcher", daemon=True)
                self.worker.start()
            self.cv.notify()
        received = 0
        while received < len(rows):
            group = [job.ready.get()]
            while not job.ready.empty():
                group.append(job.ready.get())
            for i, out in group:
                if i is None:
                    raise out
            received += len(group)
            yield group

    def _next_batch(self):
        first, _, limit = self.queue[0]
        batch, keep = [], deque()
        while self.queue:
            item = self.queue.popleft()
            job = item[0]
            if job.error is not None:  # an earlier batch of this call failed: its caller has left
                continue
            same = job is first or (first.key is not None and job.key == first.key)
            (batch if same and len(batch) < limit else keep).append(item)
        self.queue = keep
        return first, batch

    def _work(self):
        while True:
            with self.cv:
                while not self.queue:
                    if not self.cv.wait(timeout=60):
                        if not self.queue:  # idle: let the thread go; submit starts another
                            self.worker = None
                            return
                deadline = time.monotonic() + self.max_wait
                wanted = min(self.expected, self.queue[0][2])
                while len(self.queue) < wanted and (left := deadline - time.monotonic()) > 0:
                    self.cv.wait(timeout=left)
                first, batch = self._next_batch()
            handed, early = set(), Counter()  # batch rows handed back before the end; how many per call

            def row_done(k, out):  # a row that left the batch early, unless it is its call's last
                job, i, _ = batch[k]
                if job.pending - early[id(job)] > 1:
                    early[id(job)] += 1
                    handed.add(k)
                    job.results[i] = out
                    job.ready.put((i, out))

            try:
                started = time.perf_counter()
                outputs = self.run_rows([job.rows[i] for job, i, _ in batch], first.settings, first.stops,
                                        on_done=row_done)
                log.debug("batch of %d rows from %d calls: %.2f s", len(batch), len({id(j) for j, _, _ in batch}),
                          time.perf_counter() - started)
                for (job, i, _), out in zip(batch, outputs):
                    job.results[i] = out
            except BaseException as exc:  # every caller in the batch sees the failure
                for job, _, _ in batch:
                    job.error = exc
            with self.cv:  # counted before any caller of this batch is released to submit again
                for job, _, _ in batch:
                    job.pending -= 1
                answered = [job for job, _, _ in batch if job.pending == 0 or job.error is not None]  # per row
                active = {id(job) for job, _, _ in batch} | {id(job) for job, _, _ in self.queue}
                # callers answered now may come back with as many rows; queued ones are waiting already
                self.expected = len(answered) + len(self.queue) if len(active) > 1 else 0
            for k, (job, i, _) in enumerate(batch):  # released only now, after the count above
                if job.error is None and k not in handed:
                    job.ready.put((i, job.results[i]))
            for job in {id(job): job for job, _, _ in batch if job.error is not None}.values():
                job.ready.put((None, job.error))
