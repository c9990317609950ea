"""Continuous batching: one thread owns the Engine (it is not thread-safe) and, at every step, drops
cancelled requests, admits waiting ones (prefill), then runs one `decode_batch` over every running sequence.
Finished and cancelled sequences are removed at once, so their KV pages go back to the pool."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..runtime.engine import Engine
from ..runtime.request import Generation, Step

log = logging.getLogger(__name__)

# What a job's sink receives, on the engine thread: a Step (the last one has a finish_reason) or an exception
Sink = Callable[[Step | Exception], None]


class QueueFullError(Exception):
    """Every sequence slot is busy and the waiting queue is at its limit (HTTP 429)."""


@dataclass(eq=False)
class Job:
    gen: Generation
    sink: Sink
    sid: int | None = None
    cancelled: bool = False  # set from any thread; the engine thread removes the sequence at its next step


@dataclass
class SchedulerStats:
    running: int = 0
    waiting: int = 0
    free_pages: int = 0
    total_pages: int = 0


class Scheduler:
    def __init__(self, engine: Engine, *, max_sequences: int, max_queue: int) -> None:
        self.engine = engine
        self.max_sequences, self.max_queue = max_sequences, max_queue
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="phi3-engine", daemon=True)
        free = engine.free_pages()
        self.stats = SchedulerStats(free_pages=free, total_pages=free)

    # -- any thread ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def submit(self, gen: Generation, sink: Sink) -> Job:
        job = Job(gen, sink)
        with self._cv:
            if self._stop:
                raise QueueFullError("the server is shutting down")
            free_slots = self.max_sequences - len(self._running) - len(self._waiting)
            if free_slots <= 0 and len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._running)} sequences running, {len(self._waiting)} requests waiting (limits: "
                    f"--max-sequences {self.max_sequences}, --max-queue {self.max_queue}); retry later"
                )
            self._waiting.append(job)
            self.stats.waiting = len(self._waiting)
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: its sequence is removed at the next step (a no-op once it finished)."""
        with self._cv:
            job.cancelled = True
            self._cv.notify()

    # -- the engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stop:
                    break
                admit: list[Job] = []
                while self._waiting and len(self._running) + len(admit) < self.max_sequences:
                    admit.append(self._waiting.popleft())
            try:
                self._step(admit)
            except Exception as e:  # a bug or a device error: fail the requests, keep serving
                log.exception("engine step failed")
                for job in admit + self._running:
                    self._fail(job, e)
                self._running = []
            self._update_stats()
        for job in list(self._waiting) + self._running:
            self._fail(job, QueueFullError("the server is shutting down"))

    def _step(self, admit: list[Job]) -> None:
        eng = self.engine
        for job in [j for j in self._running if j.cancelled]:
            self._remove(job)
        for job in admit:
            if job.cancelled:
                continue
            job.sid = eng.add_sequence()
            self._running.append(job)
            try:
                # prefill each on its own (chunked as needed): the same logits as a single request gets
                logits = eng.prefill(job.sid, job.gen.prompt)
            except Exception as e:  # this request's problem (e.g. the context window): only it fails
                self._fail(job, e)
                continue
            self._emit(job, job.gen.step(logits))
        batch = [j for j in self._running if not j.cancelled]
        if batch:
            logits = eng.decode_batch([j.sid for j in batch], [j.gen.last_token for j in batch])
            for j, row in zip(batch, logits):
                self._emit(j, j.gen.step(row))

    def _emit(self, job: Job, st: Step) -> None:
        job.sink(st)
        if st.finish_reason:
            self._remove(job)

    def _remove(self, job: Job) -> None:
        if job in self._running:
            self._running.remove(job)
        if job.sid is not None and job.sid in self.engine.seqs:
            self.engine.remove_sequence(job.sid)  # its KV pages go back to the pool

    def _fail(self, job: Job, e: Exception) -> None:
        self._remove(job)
        try:
            job.sink(e)
        except Exception:  # a sink of a closed connection: nothing left to tell
            log.debug("sink failed", exc_info=True)

    def _update_stats(self) -> None:
        with self._cv:
            self.stats = SchedulerStats(
                running=len(self._running),
                waiting=len(self._waiting),
                free_pages=self.engine.free_pages(),
                total_pages=self.stats.total_pages,
            )
