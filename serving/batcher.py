"""Micro-batching without a wait window: whatever has queued while the model was busy runs together.

The model runs in one worker thread, never on the event loop. The event loop hands work to it through
a C-level queue that wakes the thread directly, and the thread hands each batch's results back with one
`call_soon_threadsafe`. (An earlier version ran an asyncio task that moved work into a thread-pool
executor: one more event-loop turn and the executor's bookkeeping on every request, which showed at
concurrency 1.) The queue is bounded; a full queue is refused at once (the server answers
RESOURCE_EXHAUSTED) rather than growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from classifier import ClassificationResult, InvalidInputError, RoutingRequest, TierClassifier
from serving.metrics import BatcherMetrics

Outcome = ClassificationResult | InvalidInputError
log = logging.getLogger("promptier.batcher")


class QueueFullError(Exception):
    """The bounded queue is full: the server is overloaded."""


class DeadlineExpiredError(Exception):
    """The caller's deadline passed while the item waited."""


class BatcherStoppedError(Exception):
    """The batcher was stopped before the work ran."""


@dataclass
class _Work:
    items: list[tuple[object, RoutingRequest | None]]
    deadline: float | None  # time.monotonic()
    future: asyncio.Future = field(repr=False)


_STOP = object()


class Batcher:
    """Collects classification work from many RPCs and runs it in as few model calls as possible."""

    def __init__(self, model: Callable[[], TierClassifier], metrics: BatcherMetrics, max_queue: int = 1024,
                 max_batch: int = 64) -> None:
        self._model = model
        self._metrics = metrics
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Work | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the model thread; results are delivered to the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="promptier-model", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Finish the batch in progress, fail what is still queued, and end the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._thread = None
        while True:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(work, _Work) and not work.future.done():
                work.future.set_exception(BatcherStoppedError())

    async def submit(self, items: Sequence[tuple[object, RoutingRequest | None]], timeout: float | None
                     ) -> list[Outcome]:
        """Queue items and wait for their outcomes. Raises QueueFullError or DeadlineExpiredError."""
        if self._thread is None or self._loop is None:
            raise BatcherStoppedError()
        # Only the event loop puts and only the model thread takes, so qsize() never undercounts.
        if self._queue.qsize() >= self._max_queue:
            raise QueueFullError
        work = _Work(list(items), None if timeout is None else time.monotonic() + timeout,
                     self._loop.create_future())
        self._queue.put(work)
        self._metrics.queue_depth.set(self._queue.qsize())
        return await work.future

    # ------------------------------------------------------------------ model thread
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if not isinstance(first, _Work):  # the stop marker
                return
            batch = [first]
            size = len(first.items)
            stopping = False
            while size < self._max_batch:
                try:
                    work = self._queue.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(work, _Work):
                    stopping = True
                    break
                batch.append(work)
                size += len(work.items)
            self._metrics.queue_depth.set(self._queue.qsize())
            try:
                self._run_batch(batch)
            except Exception:  # never let the model thread die: every later request would hang
                log.exception("batch delivery failed")
            if stopping:
                return

    def _run_batch(self, batch: list[_Work]) -> None:
        now = time.monotonic()
        live: list[_Work] = []
        expired: list[_Work] = []
        for work in batch:
            if work.future.done():  # the caller went away (cancelled RPC); read-only check, benign race
                continue
            (expired if work.deadline is not None and work.deadline <= now else live).append(work)
        if expired:
            self._deliver(expired, DeadlineExpiredError())
        if not live:
            return
        model = self._model()  # one model per batch: a reload never splits a request
        entries = [entry for work in live for entry in work.items]
        self._metrics.batch_size.observe(len(entries))
        try:
            outcomes: list[Outcome] | Exception = model.classify_items(entries)
        except Exception as error:  # delivered to each caller, who maps it to INTERNAL
            outcomes = error
        self._deliver(live, outcomes)

    def _deliver(self, works: list[_Work], outcomes: list[Outcome] | Exception) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(_set_outcomes, works, outcomes)


def _set_outcomes(works: list[_Work], outcomes: list[Outcome] | Exception) -> None:
    """On the event loop: hand each caller its slice of the batch, or the batch's error."""
    start = 0
    for work in works:
        if not work.future.done():
            if isinstance(outcomes, Exception):
                work.future.set_exception(outcomes)
            else:
                work.future.set_result(outcomes[start : start + len(work.items)])
        start += len(work.items)


def monotonic_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
