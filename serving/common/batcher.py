"""Micro-batching without a wait window: whatever has queued while the model was busy runs together.

The model runs in one worker thread, never on the event loop. The event loop queues work under a
lock and wakes the thread; the thread hands each model call's results back with one
`call_soon_threadsafe`. (An earlier version ran an asyncio task that moved work into a thread-pool
executor: one more event-loop turn and the executor's bookkeeping on every request, which showed at
concurrency 1.)

Admission is counted in prompts, not calls, in two lanes with a budget each: `unary` (one prompt per
call: interactive traffic) and `batch` (calls carrying many prompts). A call that would take its lane
past its budget is refused at once (QueueFullError, which the server answers RESOURCE_EXHAUSTED)
rather than growing memory, and a full batch lane never refuses a unary call. The model thread takes
at most `max_batch` prompts per model call, cutting a large batch call into several model calls.
Queued unary prompts run next, in a model call of their own, never topped up with batch prompts (each
unary prompt would then wait for a whole batch chunk's compute), unless the previous call was such a
one and batch prompts wait: then a batch chunk runs, topped up with unary prompts if it has room. So
unary prompts wait for at most one model call of batch prompts however many of those are queued, and
a stream of unary calls cannot starve the batch lane either.

Within a lane, callers (to the gRPC service: a connection, or the client a proxy names) take turns:
a model call takes a call from each caller with work queued in turn, so one caller's flood of queued
calls delays another caller's call by at most one model call, not by the whole flood. And no caller
may hold more than half of the batch lane's budget (CALLER_SHARE), where a few large calls from one
caller would otherwise fill it and shut out the rest. (In the unary lane, one prompt a call, a
connection's calls in flight are bounded by gRPC's stream limit, 256 against a lane of 1,024 by
default; the dispatcher's embedded model names the request's tenant as its caller.) Work submitted
without a caller is one caller with no share limit.

Each call is answered by one model: a batch call cut into several model calls is run by the model
that took its first prompts, even if a reload swapped in another in between.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import CollectorRegistry, Gauge, Histogram

from classifier import ClassificationResult, PromptierError, RoutingRequest, TierClassifier

Outcome = ClassificationResult | PromptierError  # per item: a decision, or why there is none
Lane = Literal["unary", "batch"]
LANES: tuple[Lane, ...] = ("unary", "batch")
# The most of the batch lane's budget one caller may hold: with two callers or more it is never one's alone.
CALLER_SHARE = 0.5
log = logging.getLogger("promptier.batcher")


class BatcherMetrics:
    """What the micro-batcher reports: queue depth and prompts per model call, under `prefix`."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        # livesum: with the dispatcher's `--workers`, the sum over the running processes.
        self.queue_depth = Gauge(f"{prefix}_queue_depth", "prompts waiting for the model", registry=registry,
                                 multiprocess_mode="livesum")
        self.batch_size = Histogram(f"{prefix}_batch_size", "prompts per model call", registry=registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


class QueueFullError(Exception):
    """Admitting the call would take its lane past its budget of queued prompts (the server is
    overloaded), or its caller past its share of that budget (`by_caller`: that caller sends too much)."""

    def __init__(self, lane: Lane, by_caller: bool = False) -> None:
        super().__init__(f"this caller holds its share of the {lane} queue" if by_caller
                         else f"the {lane} queue is full")
        self.lane = lane
        self.by_caller = by_caller


class DeadlineExpiredError(Exception):
    """The caller's deadline passed while the item waited."""


class BatcherStoppedError(Exception):
    """The batcher was stopped before the work ran."""


@dataclass(eq=False)
class _Work:
    items: list[tuple[object, RoutingRequest | None]]
    deadline: float | None  # time.monotonic()
    future: asyncio.Future = field(repr=False)
    lane: Lane
    caller: str | None = None
    model: TierClassifier | None = field(default=None, repr=False)  # the model that took its first prompts
    taken: int = 0  # items handed to the model so far (a batch call may span several model calls)
    outcomes: list[Outcome] = field(default_factory=list)  # written by the model thread only


@dataclass
class _Chunk:
    work: _Work
    start: int
    end: int


Answer = tuple[_Work, list[Outcome] | BaseException]  # a call's outcomes, or the error of its model call


class _Lane:
    """A lane's queued works: one queue per caller, callers served in turn, and the prompts each holds."""

    def __init__(self) -> None:
        self._turns: collections.OrderedDict[str | None, collections.deque[_Work]] = collections.OrderedDict()
        self._held: collections.Counter[str | None] = collections.Counter()
        self.queued = 0  # prompts not yet handed to the model

    def __bool__(self) -> bool:
        return bool(self._turns)

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._turns.values())

    def __iter__(self) -> Iterator[_Work]:
        for queue in self._turns.values():
            yield from queue

    def __contains__(self, work: _Work) -> bool:
        return work in self._turns.get(work.caller, ())

    def held(self, caller: str | None) -> int:
        """Prompts `caller` has waiting in this lane."""
        return self._held[caller]

    def add(self, work: _Work) -> None:
        self._turns.setdefault(work.caller, collections.deque()).append(work)
        self._count(work.caller, len(work.items))

    def next_work(self) -> _Work:
        """The first queued work of the caller whose turn it is."""
        return next(iter(self._turns.values()))[0]

    def took(self, work: _Work, end: int) -> None:
        """`work`, the next work, has had its prompts up to `end` handed to the model: its caller's turn is
        over (a work not finished stays first in that caller's queue)."""
        self._count(work.caller, -(end - work.taken))
        work.taken = end
        queue = self._turns[work.caller]
        if end == len(work.items):
            queue.popleft()
        if queue:
            self._turns.move_to_end(work.caller)
        else:
            del self._turns[work.caller]

    def remove(self, work: _Work) -> bool:
        """Drop `work` and its prompts not yet taken; False when it is not queued (taken whole already)."""
        queue = self._turns.get(work.caller)
        if queue is None:
            return False
        try:
            queue.remove(work)  # O(the caller's queued works), bounded by the lane's budget
        except ValueError:
            return False
        if not queue:
            del self._turns[work.caller]
        self._count(work.caller, -(len(work.items) - work.taken))
        return True

    def clear(self) -> None:
        self._turns.clear()
        self._held.clear()
        self.queued = 0

    def _count(self, caller: str | None, prompts: int) -> None:
        self.queued += prompts
        self._held[caller] += prompts
        if self._held[caller] <= 0:
            del self._held[caller]


class Batcher:
    """Collects classification work from many RPCs and runs it in as few model calls as possible."""

    def __init__(self, model: Callable[[], TierClassifier], metrics: BatcherMetrics, max_queue: int = 1024,
                 max_batch: int = 64, max_batch_queue: int | None = None) -> None:
        """
        Args:
            model: returns the model to run a batch with (read once per model call).
            metrics: where queue depth and batch sizes are reported.
            max_queue: prompts of the `unary` lane that may wait for the model.
            max_batch: prompts per model call (a call is never split below one prompt).
            max_batch_queue: prompts of the `batch` lane that may wait; None: as many as `max_queue`.
        """
        if max_queue < 1 or max_batch < 1 or (max_batch_queue is not None and max_batch_queue < 1):
            raise ValueError("max_queue, max_batch and max_batch_queue must be at least 1")
        self._model = model
        self._metrics = metrics
        self._budgets: dict[Lane, int] = {"unary": max_queue,
                                          "batch": max_queue if max_batch_queue is None else max_batch_queue}
        self._max_batch = max_batch
        self._lanes: dict[Lane, _Lane] = {lane: _Lane() for lane in LANES}
        self._running: list[_Work] = []  # works with prompts in the model call in progress
        self._last_was_unary = False  # whether the last model call was taken unary lane first
        self._arriving = 0  # calls being prepared for `submit` (see `arriving`)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the model thread; results are delivered to the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="promptier-model", daemon=True)
        self._thread.start()

    def queued(self, lane: Lane) -> int:
        """Prompts of `lane` waiting for the model (not counting those in the model call in progress)."""
        with self._wake:
            return self._lanes[lane].queued

    def calls(self, lane: Lane) -> int:
        """Calls of `lane` not yet answered: waiting for the model or in the model call in progress."""
        with self._wake:
            return len(self._lanes[lane]) + sum(1 for work in self._running
                                                if work.lane == lane and work not in self._lanes[lane])

    def idle(self) -> bool:
        """Whether nothing waits for the model, no model call is in progress and no call is `arriving`."""
        with self._wake:
            return not self._running and not any(self._lanes.values()) and not self._arriving

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Count a call as in flight while it is prepared for `submit` away from the event loop (a large
        batch rendered on a thread): a drain waits for it as for queued work, rather than stopping
        the batcher under it. Submit right after the block, with no await between."""
        with self._wake:
            self._arriving += 1
        try:
            yield
        finally:
            with self._wake:
                self._arriving -= 1

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the batcher to become idle; returns whether it did."""
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)  # only on shutdown: a short poll costs nothing there
        return True

    async def stop(self, join_timeout: float = 30.0) -> None:
        """Fail everything not yet answered (queued or in the model) with BatcherStoppedError, so each
        caller gets an explicit answer, then end the thread once its model call in progress returns."""
        if self._thread is None:
            return
        with self._wake:
            self._stopping = True
            pending = [work for lane in LANES for work in self._lanes[lane]] + self._running
            for lane in LANES:
                self._lanes[lane].clear()
            self._wake.notify_all()
        self._metrics.queue_depth.set(0)
        for work in pending:
            if not work.future.done():
                work.future.set_exception(BatcherStoppedError())
        thread, self._thread = self._thread, None
        await asyncio.get_running_loop().run_in_executor(None, thread.join, join_timeout)

    async def submit(self, items: Sequence[tuple[object, RoutingRequest | None]], timeout: float | None,
                     lane: Lane = "unary", caller: str | None = None) -> list[Outcome]:
        """Queue items and wait for their outcomes.

        Args:
            caller: who sends them (callers take turns within a lane, and each holds at most CALLER_SHARE
                of the batch lane); None: one caller for all such work, with no share limit.

        Raises:
            QueueFullError: the lane has no room for these prompts, or their caller holds its share.
            DeadlineExpiredError: `timeout` passed before the model reached them.
            BatcherStoppedError: the batcher is stopped or stopping.
        """
        if self._thread is None or self._loop is None or self._stopping:
            raise BatcherStoppedError()
        work = _Work(list(items), None if timeout is None else time.monotonic() + timeout,
                     self._loop.create_future(), lane, caller)
        with self._wake:
            queue, budget = self._lanes[lane], self._budgets[lane]
            # An empty lane takes any one call, whatever its size; so does a caller holding nothing.
            if queue.queued + len(work.items) > budget and queue.queued > 0:
                raise QueueFullError(lane)
            held = queue.held(caller)
            if lane == "batch" and caller is not None and held + len(work.items) > budget * CALLER_SHARE and held > 0:
                raise QueueFullError(lane, by_caller=True)
            queue.add(work)
            depth = self._depth()
            self._wake.notify()
        self._metrics.queue_depth.set(depth)
        try:
            return await work.future
        except asyncio.CancelledError:
            self._withdraw(work)  # the caller went away: its prompts no longer hold the lane's budget
            raise

    def _withdraw(self, work: _Work) -> None:
        with self._wake:
            if not self._lanes[work.lane].remove(work):
                return  # fully handed to the model already
            depth = self._depth()
        self._metrics.queue_depth.set(depth)

    def _depth(self) -> int:
        """Under the lock: prompts waiting for the model, both lanes."""
        return sum(queue.queued for queue in self._lanes.values())

    # ------------------------------------------------------------------ model thread
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not any(self._lanes.values()):
                    self._wake.wait()
                if self._stopping:
                    return
                chunks, expired = self._take()
                self._running = list({id(chunk.work): chunk.work for chunk in chunks}.values())
                depth = self._depth()
            self._metrics.queue_depth.set(depth)
            try:
                self._run_chunks(chunks, expired)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # never let the model thread die: every later request would hang
                log.exception("batch delivery failed")
            finally:
                with self._wake:
                    self._running = []

    def _take(self) -> tuple[list[_Chunk], list[_Work]]:
        """Under the lock: the next model call's prompts (up to max_batch), and works whose deadline passed.

        Unary prompts alone when they wait, unless the last call was unary and batch prompts wait: then
        batch prompts first, unary ones filling any room left. Within a lane, callers take turns: one
        work (or as much of it as fits) from each.
        """
        now = time.monotonic()
        chunks: list[_Chunk] = []
        expired: list[_Work] = []
        size = 0

        def fill(lane: Lane) -> None:
            nonlocal size
            queue = self._lanes[lane]
            while queue and size < self._max_batch:
                work = queue.next_work()
                if work.future.done() or (work.deadline is not None and work.deadline <= now):
                    queue.remove(work)
                    if not work.future.done():
                        expired.append(work)
                    continue
                end = min(len(work.items), work.taken + self._max_batch - size)
                chunks.append(_Chunk(work, work.taken, end))
                size += end - work.taken
                queue.took(work, end)

        if not (self._last_was_unary and self._lanes["batch"]):
            fill("unary")
        self._last_was_unary = bool(chunks)
        if not chunks:
            fill("batch")
            fill("unary")  # room a short batch remainder left (or the unary turn was skipped)
        return chunks, expired

    def _run_chunks(self, chunks: list[_Chunk], expired: list[_Work]) -> None:
        answers: list[Answer] = [(work, DeadlineExpiredError()) for work in expired]
        if chunks:
            current = self._model()  # read once per model call
            for chunk in chunks:
                if chunk.work.model is None:
                    chunk.work.model = current
            # One model call, unless a reload came between the pieces of a batch call, which finishes on
            # the model it started with: then one call per model.
            for model, group in _by_model(chunks):
                answers.extend(self._classify(model, group))
        if answers:
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
                self._loop.call_soon_threadsafe(_set_outcomes, answers)

    def _classify(self, model: TierClassifier, chunks: list[_Chunk]) -> list[Answer]:
        """Run `chunks` in one call of `model`: the works this completes, with their outcomes, or each
        work's error if the call failed."""
        entries = [entry for chunk in chunks for entry in chunk.work.items[chunk.start : chunk.end]]
        self._metrics.batch_size.observe(len(entries))
        try:
            outcomes = model.classify_items(entries)
        except Exception as error:  # delivered to each caller, who maps it to INTERNAL
            failed = list({id(chunk.work): chunk.work for chunk in chunks}.values())
            self._forget(failed)
            return [(work, error) for work in failed]
        answers: list[Answer] = []
        start = 0
        for chunk in chunks:
            count = chunk.end - chunk.start
            chunk.work.outcomes.extend(outcomes[start : start + count])
            start += count
            if len(chunk.work.outcomes) == len(chunk.work.items):
                answers.append((chunk.work, chunk.work.outcomes))
        return answers

    def _forget(self, works: list[_Work]) -> None:
        """Drop what is still queued of works that have failed (a batch call cut in several model calls)."""
        with self._wake:
            for work in works:
                if work.taken < len(work.items):
                    self._lanes[work.lane].remove(work)


def _by_model(chunks: list[_Chunk]) -> list[tuple[TierClassifier, list[_Chunk]]]:
    """`chunks` grouped by the model their work is pinned to, in order of first appearance."""
    groups: dict[int, tuple[TierClassifier, list[_Chunk]]] = {}
    for chunk in chunks:
        model = chunk.work.model
        assert model is not None  # pinned before grouping
        groups.setdefault(id(model), (model, []))[1].append(chunk)
    return list(groups.values())


def _set_outcomes(answers: list[Answer]) -> None:
    """On the event loop: hand each caller its outcomes, or the error of its model call."""
    for work, answer in answers:
        if work.future.done():
            continue
        if isinstance(answer, BaseException):
            work.future.set_exception(answer)
        else:
            work.future.set_result(answer)


def monotonic_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
