"""The scheduler: one thread owns the backend and the one loop (``runtime.TokenStream``),
and requests join and leave its batch at every step (continuous batching).

As in vLLM's scheduler and llama.cpp's server slots: a bounded queue of waiting requests; at
each step the waiting ones that fit (``max_batch`` rows in all) are prefilled and merged into
the running batch, one decode step runs for every row, each row's new text goes to its
request, and rows that ended (their length, ``<|endoftext|>``, a stop string, a client gone,
the time limit) leave the batch before the next step. A request of ``n`` choices over
``p`` prompts is ``n * p`` rows sampling with one generator (its seed).

The HTTP side (``app.py``) never touches torch: it submits a ``Job`` and reads its events
from an asyncio queue, which this thread fills through the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slm_export.runtime import SamplingConfig, TokenStream, make_generator
from slm_export.runtime.text import StopStrings, TextDecoder
from slm_export.serve.metrics import Metrics
from slm_export.tokenizer import EOT_ID

FINISH = {"eot": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled",
          "timeout": "length"}  # the loop's reasons as OpenAI's finish_reason


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests: try again later."""


class Draining(Exception):
    """The server is shutting down: no new requests."""


@dataclass(eq=False)
class Job:
    """One completion request: its rows' prompts (token ids), how they sample and end, and
    where its events go: ("text", choice, str), ("finish", choice, reason, tokens) and, last,
    ("done", usage) or ("error", message, HTTP status)."""

    prompts: list[list[int]]  # one per choice, in choice order
    max_tokens: int
    sampling: SamplingConfig
    seed: int | None
    stop: list[str]
    deadline: float  # time.monotonic() after which its rows are cut
    emit: Callable[[tuple], None]
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    rows: dict[int, int] = field(default_factory=dict)  # stream row id -> choice
    texts: dict[int, tuple] = field(default_factory=dict)  # choice -> (decoder, stop strings)
    completion_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None

    def cancel(self) -> None:
        """The client left: the rows leave the batch at the next step."""
        self.cancelled = True


class Scheduler:
    def __init__(self, backend, *, max_batch: int = 16, max_queue: int = 64,
                 metrics: Metrics | None = None, overflow: str = "rebase", idle_s: float = 0.05):
        self.backend, self.max_batch, self.max_queue = backend, max_batch, max_queue
        self.metrics = metrics or Metrics()
        self.stream = TokenStream(backend, overflow=overflow)
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[int, Job] = {}  # stream row id -> its job
        self._lock = threading.Condition()
        self._stop = self._draining = False
        self._idle_s = idle_s
        self._thread = threading.Thread(target=self._run, name="slm-serve-scheduler", daemon=True)
        self._ids = itertools.count()

    # -- the HTTP side ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._draining:
                raise Draining("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._lock.notify()

    def drain(self, grace_s: float) -> None:
        """Stop taking requests; cut the rows still running after ``grace_s`` seconds (their
        streams end with finish_reason "length"), then stop the thread."""
        with self._lock:
            self._draining = True
            for job in self._waiting:
                job.emit(("error", "the server is shutting down", 503))
            self._waiting.clear()
            self._lock.notify()
        end = time.monotonic() + grace_s
        while self._running and time.monotonic() < end and self._thread.is_alive():
            time.sleep(0.05)
        with self._lock:
            for job in set(self._running.values()):
                job.deadline = 0.0  # cut at the next step
            self._lock.notify()
        while self._running and self._thread.is_alive():
            time.sleep(0.02)
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=10)

    @property
    def rows(self) -> int:
        return len(self._running)

    @property
    def draining(self) -> bool:
        return self._draining

    # -- the scheduler thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._running:
                    self._lock.wait(self._idle_s)
                if self._stop:
                    self.stream.close()
                    return
                self._admit()
            try:
                self._step()
            except Exception as e:  # a backend failure ends the running requests, not the server
                for job in set(self._running.values()):
                    job.emit(("error", f"generation failed ({type(e).__name__}: {e})", 500))
                for row in list(self._running):
                    self.stream.finish(row, "cancelled")
                    self._release(row)

    def _admit(self) -> None:
        """Waiting jobs that fit the batch join it (prefilled at the next step), in order."""
        while self._waiting and self.rows + len(self._waiting[0].prompts) <= self.max_batch:
            job = self._waiting.popleft()
            generator = None
            if not job.sampling.is_greedy:
                generator = make_generator(job.seed, self.backend.device)
            ids = self.stream.add(job.prompts, max_new_tokens=job.max_tokens, sampling=job.sampling,
                                  generator=generator, stop_id=EOT_ID)
            for choice, row in enumerate(ids):
                job.rows[row] = choice
                job.texts[choice] = (TextDecoder(), StopStrings(job.stop))
                self._running[row] = job
        self.metrics.queue_depth.set(len(self._waiting))

    def _step(self) -> None:
        now = time.monotonic()
        for row, job in self._running.items():  # clients gone, time limits
            if job.cancelled:
                self.stream.finish(row, "cancelled")
            elif now > job.deadline:
                self.stream.finish(row, "timeout")
        self.metrics.running_rows.set(len(self.stream.live))
        out = self.stream.step()
        now = time.monotonic()
        for row, tokens in out.items():
            self._deliver(self._running[row], row, tokens, now)
        for row in [r for r in self._running if self.stream.rows[r].finish is not None]:
            self._finish(row)

    def _deliver(self, job: Job, row: int, tokens: list[int], now: float) -> None:
        """A row's new tokens as text to its job (a stop string ends the row)."""
        if not tokens:
            return
        if job.first_token_at is None:
            self.metrics.time_to_first_token.observe(now - job.submitted)
        elif job.last_token_at is not None:
            self.metrics.inter_token_latency.observe(now - job.last_token_at)
        job.first_token_at = job.first_token_at or now
        job.last_token_at = now
        decoder, stops = job.texts[job.rows[row]]
        text = []
        for token in tokens:
            piece, stopped = stops.push(decoder.push(token))
            text.append(piece)
            if stopped:
                self.stream.finish(row, "stop")
                break
        self.metrics.tokens_generated.inc(len(tokens))
        job.completion_tokens += len(tokens)
        if "".join(text):
            job.emit(("text", job.rows[row], "".join(text)))

    def _finish(self, row: int) -> None:
        job = self._running[row]
        record = self.stream.rows[row]
        decoder, stops = job.texts[job.rows[row]]
        if record.finish not in ("stop", "cancelled"):  # what the decoder and stops still hold
            tail, _ = stops.push(decoder.flush())
            tail += stops.flush()
            if tail:
                job.emit(("text", job.rows[row], tail))
        job.emit(("finish", job.rows[row], FINISH[record.finish], record.emitted))
        self._release(row)
        if not any(j is job for j in self._running.values()):
            self.metrics.requests.labels(outcome="cancelled" if job.cancelled else "ok").inc()
            job.emit(("done", {"prompt_tokens": sum(map(len, job.prompts)),
                               "completion_tokens": job.completion_tokens,
                               "total_tokens": sum(map(len, job.prompts)) + job.completion_tokens}))

    def _release(self, row: int) -> None:
        del self._running[row]
        self.stream.forget(row)


def threadsafe_emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[tuple], None]:
    """``Job.emit`` for a request served on ``loop``: events reach ``queue`` in order."""
    def emit(event: tuple) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)
    return emit


def warm_up(backend, max_batch: int) -> float:
    """Compile and touch what serving will run: a prefill and steps at every batch size up to
    ``max_batch`` (a compiled backend compiles per batch size; the others only warm their
    allocators). -> seconds."""
    from slm_export.runtime import GREEDY, generate

    start = time.perf_counter()
    sizes = sorted({1, *(2 ** k for k in range(1, max_batch.bit_length()) if 2 ** k <= max_batch),
                    max_batch})
    with torch.inference_mode():
        for size in sizes:
            generate(backend, [[EOT_ID, 7454, 2402]] * size, max_new_tokens=3, sampling=GREEDY,
                     stop_id=None)
    return time.perf_counter() - start
