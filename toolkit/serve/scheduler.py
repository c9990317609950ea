"""Continuous batching with chunked prefill: one thread owns the Engine (it is not thread-safe) and, at every
step, drops cancelled requests, admits waiting ones into free sequence slots, feeds prompt pieces worth at
most one prefill chunk (oldest admitted prompt first), then runs one `decode_batch` over every running
sequence.

A long prompt is therefore fed over several steps with a decode step of the running batch after each chunk:
the streams already running keep emitting tokens instead of stalling for the whole prefill. A prompt is cut
where the engine's own `prefill` cuts it (`Engine.prefill_pieces`), never where another request's piece
happened to end, so its logits are the ones a single request gets: a different cut runs other kernel paths
(on the host build, logits of the embedded model moved by up to 0.7 of their ~30 range), and greedy outputs
would then depend on what else was running. Finished and cancelled sequences are removed at once, so their
KV pages go back to the pool."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..runtime.engine import Engine
from ..runtime.request import Generation, Step, draw_for

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
    pieces: list[int] | None = None  # sizes of the prompt pieces still to feed (set on admission)
    cancelled: bool = False  # set from any thread; the engine thread removes the sequence at its next step


@dataclass
class SchedulerStats:
    running: int = 0  # decoding
    prefilling: int = 0  # admitted, prompt not fully fed yet
    waiting: int = 0
    free_pages: int = 0
    total_pages: int = 0


class Scheduler:
    """The prompt tokens fed per step are bounded by the engine's prefill chunk (`serve --prefill-chunk`):
    smaller, and running streams wait less behind a long prompt, which takes more steps."""

    def __init__(self, engine: Engine, *, max_sequences: int, max_queue: int) -> None:
        self.engine = engine
        self.max_sequences, self.max_queue = max_sequences, max_queue
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._prefilling: list[Job] = []  # in admission order
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
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, gen: Generation, sink: Sink) -> Job:
        job = Job(gen, sink)
        with self._cv:
            if self._stop:
                raise QueueFullError("the server is shutting down")
            busy = len(self._running) + len(self._prefilling)
            if busy + len(self._waiting) >= self.max_sequences and len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"{busy} sequences running, {len(self._waiting)} requests waiting (limits: "
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
                while not (self._stop or self._waiting or self._prefilling or self._running):
                    self._cv.wait()
                if self._stop:
                    break
            self.step()
        for job in list(self._waiting) + self._prefilling + self._running:
            self._fail(job, QueueFullError("the server is shutting down"))

    def step(self) -> bool:
        """One step of the engine thread's loop (tests call it directly, the thread not started).
        Returns False when there was nothing to do."""
        with self._cv:
            while self._waiting and len(self._prefilling) + len(self._running) < self.max_sequences:
                job = self._waiting.popleft()
                if not job.cancelled:
                    self._prefilling.append(job)
            if not (self._prefilling or self._running):
                self.stats.waiting = len(self._waiting)
                return False
        try:
            self._step()
        except Exception as e:  # a bug or a device error: fail the requests, keep serving
            log.exception("engine step failed")
            for job in self._prefilling + self._running:
                self._fail(job, e)
        self._update_stats()
        return True

    def _step(self) -> None:
        for job in [j for j in self._prefilling + self._running if j.cancelled]:
            self._remove(job)
        self._prefill(budget=self.engine.prefill_chunk)
        self._decode()

    def _prefill(self, budget: int) -> None:
        """Feed whole prompt pieces, oldest admitted prompt first, while they fit in `budget` tokens (the
        first piece always: a LongRoPE one may be larger). A prompt fed to its end samples its first token
        and joins the running batch."""
        eng, first = self.engine, True
        for job in list(self._prefilling):
            prompt = job.gen.prompt
            if job.pieces is None:
                job.pieces = [n for _, n in eng.prefill_pieces(0, len(prompt))]
            while job.pieces and (first or job.pieces[0] <= budget):
                size, fed = job.pieces[0], len(prompt) - sum(job.pieces)
                try:
                    if job.sid is None:
                        job.sid = eng.add_sequence()
                    last = len(job.pieces) == 1  # the piece whose logits give the first token
                    draw = draw_for(eng, job.gen) if last else None
                    out = eng.prefill(job.sid, prompt[fed : fed + size], draw=draw)
                except Exception as e:  # this request's problem (e.g. the context window): only it fails
                    self._fail(job, e)
                    break
                first = False
                budget -= size
                job.pieces.pop(0)
                if not job.pieces:
                    self._running.append(job)
                    self._prefilling.remove(job)
                    self._emit(job, job.gen.step(out))
            if job in self._prefilling:  # its next piece waits for the next step; nobody jumps ahead
                return

    def _decode(self) -> None:
        batch = [j for j in self._running if not j.cancelled]
        if batch:
            eng = self.engine
            draws = None if eng.sampler is None else [draw_for(eng, j.gen) for j in batch]
            outs = eng.decode_batch([j.sid for j in batch], [j.gen.last_token for j in batch], draws)
            for j, out in zip(batch, outs):
                self._emit(j, j.gen.step(out))

    def _emit(self, job: Job, st: Step) -> None:
        job.sink(st)
        if st.finish_reason:
            self._remove(job)

    def _remove(self, job: Job) -> None:
        for jobs in (self._prefilling, self._running):
            if job in jobs:
                jobs.remove(job)
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
                prefilling=len(self._prefilling),
                waiting=len(self._waiting),
                free_pages=self.engine.free_pages(),
                total_pages=self.stats.total_pages,
            )
