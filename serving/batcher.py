"""Micro-batching without a wait window: whatever has queued while the model was busy runs together.

The model runs in one worker thread, never on the event loop. The queue is bounded; a full queue
is refused at once (the server answers RESOURCE_EXHAUSTED) rather than growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from classifier import ClassificationResult, InvalidInputError, RoutingRequest, TierClassifier
from serving.metrics import ServerMetrics

Outcome = ClassificationResult | InvalidInputError


class QueueFullError(Exception):
    """The bounded queue is full: the server is overloaded."""


class DeadlineExpiredError(Exception):
    """The caller's deadline passed while the item waited."""


@dataclass
class _Work:
    items: list[tuple[object, RoutingRequest | None]]
    deadline: float | None  # loop time
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Collects classification work from many RPCs and runs it in as few model calls as possible."""

    def __init__(self, model: Callable[[], TierClassifier], metrics: ServerMetrics, max_queue: int = 1024,
                 max_batch: int = 64) -> None:
        self._model = model
        self._metrics = metrics
        self._queue: asyncio.Queue[_Work] = asyncio.Queue(maxsize=max_queue)
        self._max_batch = max_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptier-model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, items: Sequence[tuple[object, RoutingRequest | None]], timeout: float | None
                     ) -> list[Outcome]:
        """Queue items and wait for their outcomes. Raises QueueFullError or DeadlineExpiredError."""
        loop = asyncio.get_running_loop()
        work = _Work(list(items), None if timeout is None else loop.time() + timeout, loop.create_future())
        try:
            self._queue.put_nowait(work)
        except asyncio.QueueFull as exc:
            raise QueueFullError from exc
        self._metrics.queue_depth.set(self._queue.qsize())
        return await work.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0].items)
            while size < self._max_batch and not self._queue.empty():
                work = self._queue.get_nowait()
                batch.append(work)
                size += len(work.items)
            self._metrics.queue_depth.set(self._queue.qsize())
            now = loop.time()
            live = []
            for work in batch:
                if work.future.done():  # the caller went away (cancelled RPC)
                    continue
                if work.deadline is not None and work.deadline <= now:
                    work.future.set_exception(DeadlineExpiredError())
                    continue
                live.append(work)
            if not live:
                continue
            model = self._model()  # one model per batch: a reload never splits a request
            entries = [entry for work in live for entry in work.items]
            self._metrics.batch_size.observe(len(entries))
            try:
                outcomes = await loop.run_in_executor(self._executor, model.classify_items, entries)
            except Exception as error:  # delivered to each caller, who maps it to INTERNAL
                for work in live:
                    if not work.future.done():
                        work.future.set_exception(error)
                continue
            start = 0
            for work in live:
                if not work.future.done():
                    work.future.set_result(outcomes[start : start + len(work.items)])
                start += len(work.items)


def monotonic_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
