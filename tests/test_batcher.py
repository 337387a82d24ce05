"""The micro-batcher's turns between the unary and batch lanes, on a model that records its calls."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Sequence

from prometheus_client import CollectorRegistry

from serving.common.batcher import Batcher, BatcherMetrics, QueueFullError
from serving.dispatch.route_classifier import EmbeddedRouteClassifier


class _RecordingModel:
    """Holds its first call until released; records the prompts of every call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def classify_items(self, items: Sequence[tuple[object, object]]) -> list[str]:
        self.entered.set()
        self.release.wait(30)
        self.calls.append([str(text) for text, _ in items])
        return [str(text) for text, _ in items]


async def _until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _batcher(model: object, max_batch: int = 8, budget: int = 1000) -> Batcher:
    return Batcher(lambda: model, BatcherMetrics(CollectorRegistry(), "test"),  # type: ignore[arg-type,return-value]
                   max_queue=budget, max_batch=max_batch, max_batch_queue=budget)


@contextlib.asynccontextmanager
async def _running(model: _RecordingModel, max_batch: int = 8, budget: int = 1000) -> AsyncIterator[Batcher]:
    """A started batcher over `model`; on the way out the model is released and the batcher stopped."""
    batcher = _batcher(model, max_batch, budget)
    batcher.start()
    try:
        yield batcher
    finally:
        model.release.set()
        await batcher.stop()


def test_a_stream_of_unary_calls_cannot_starve_a_batch_call() -> None:
    async def scenario() -> list[list[str]]:
        model = _RecordingModel()
        async with _running(model) as batcher:
            first = asyncio.ensure_future(batcher.submit([("u-first", None)], timeout=None))
            await _until(model.entered.is_set, "the first call to enter the model")
            batch = asyncio.ensure_future(batcher.submit([(f"b{i}", None) for i in range(20)], timeout=None,
                                                         lane="batch"))
            unary = [asyncio.ensure_future(batcher.submit([(f"u{i}", None)], timeout=None)) for i in range(80)]
            await _until(lambda: batcher.queued("batch") == 20 and batcher.queued("unary") == 80, "all queued")
            model.release.set()
            await asyncio.gather(first, batch, *unary)
            return model.calls

    calls = asyncio.run(scenario())
    kinds = ["batch" if call[0].startswith("b") else "unary" for call in calls]
    # The held call was unary; then turns alternate while both lanes have work: the batch call's three
    # chunks are done by the sixth call, not after the 80 unary prompts queued beside it.
    assert kinds[:6] == ["unary", "batch", "unary", "batch", "unary", "batch"], kinds
    assert all(len(call) <= 8 for call in calls)
    assert all(prompt.startswith("u") for call in calls if call[0].startswith("u") for prompt in call)


def test_callers_take_turns_so_one_callers_flood_delays_another_by_one_model_call() -> None:
    async def scenario() -> list[list[str]]:
        model = _RecordingModel()
        async with _running(model) as batcher:
            first = asyncio.ensure_future(batcher.submit([("flood-first", None)], None, caller="flooder"))
            await _until(model.entered.is_set, "the first call to enter the model")
            flood = [asyncio.ensure_future(batcher.submit([(f"flood{i}", None)], None, caller="flooder"))
                     for i in range(200)]
            await _until(lambda: batcher.queued("unary") == 200, "the flood to queue")
            other = asyncio.ensure_future(batcher.submit([("other", None)], None, caller="other"))
            await _until(lambda: batcher.queued("unary") == 201, "the other caller's call to queue")
            model.release.set()
            await asyncio.gather(first, other, *flood)
            return model.calls

    calls = asyncio.run(scenario())
    # The call after the held one already carries the other caller's prompt, queued behind 200 of the
    # flooder's; first come first served would have run it 25 model calls later.
    assert "other" in calls[1], calls[:3]
    assert sum(len(call) for call in calls) == 202 and all(len(call) <= 8 for call in calls)


def test_one_caller_may_hold_half_the_batch_lane_and_the_rest_stays_for_others() -> None:
    async def scenario() -> tuple[list[str], int]:
        model = _RecordingModel()
        refusals: list[str] = []
        async with _running(model, max_batch=64, budget=1024) as batcher:
            first = asyncio.ensure_future(batcher.submit([(f"a{i}", None) for i in range(64)], None, "batch", "a"))
            await _until(model.entered.is_set, "the first call to enter the model")
            admitted = [asyncio.ensure_future(batcher.submit([(f"a{i}", None) for i in range(256)], None, "batch",
                                                             "a")) for _ in range(2)]
            await _until(lambda: batcher.queued("batch") == 512, "the flooder's half to queue")
            try:
                await batcher.submit([("a-more", None)], None, "batch", "a")
            except QueueFullError as error:
                refusals.append(f"a refused by_caller={error.by_caller}: {error}")
            others = asyncio.ensure_future(batcher.submit([(f"b{i}", None) for i in range(256)], None, "batch", "b"))
            await _until(lambda: batcher.queued("batch") == 768, "another caller's call to queue")
            model.release.set()
            await asyncio.gather(first, *admitted)
            return refusals, len(await others)

    refusals, others_answered = asyncio.run(scenario())
    assert refusals == ["a refused by_caller=True: this caller holds its share of the batch queue"]
    assert others_answered == 256  # admitted beside the flooder's half, and served


class _ModelThatAnswersItsName:
    """Answers each prompt with its own name; holds every call until released, once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entered = threading.Event()
        self.release = threading.Event()

    def classify_items(self, items: Sequence[tuple[object, object]]) -> list[str]:
        self.entered.set()
        self.release.wait(30)
        return [self.name] * len(items)


def test_a_batch_call_cut_into_pieces_is_answered_by_one_model_across_a_reload() -> None:
    async def scenario() -> tuple[Sequence[object], Sequence[object]]:
        old, new = _ModelThatAnswersItsName("old"), _ModelThatAnswersItsName("new")
        new.release.set()
        current = [old]
        batcher = Batcher(lambda: current[0], BatcherMetrics(CollectorRegistry(), "test"),  # type: ignore[arg-type,return-value]
                          max_queue=100, max_batch=8, max_batch_queue=100)
        batcher.start()
        try:
            batch = asyncio.ensure_future(batcher.submit([(f"b{i}", None) for i in range(20)], None, "batch"))
            await _until(old.entered.is_set, "the batch's first piece to enter the old model")
            current[0] = new  # a reload while the first of three pieces runs
            later = asyncio.ensure_future(batcher.submit([("u", None)], None))
            old.release.set()
            return await batch, await later
        finally:
            old.release.set()
            await batcher.stop()

    batch_answers, later_answers = asyncio.run(scenario())
    assert batch_answers == ["old"] * 20  # every piece on the model that took its first prompts
    assert later_answers == ["new"]  # a call that came after the reload gets the new model


def test_a_drain_waits_for_a_call_still_being_prepared() -> None:
    async def scenario() -> tuple[bool, bool, Sequence[object]]:
        model = _RecordingModel()
        model.release.set()
        async with _running(model) as batcher:
            with batcher.arriving():  # a large batch being rendered on a thread
                idle_while_preparing = await batcher.drain(0.05)
            answer = asyncio.ensure_future(batcher.submit([("prepared", None)], None, "batch"))
            drained = await batcher.drain(60)
            return idle_while_preparing, drained, await answer

    idle_while_preparing, drained, answer = asyncio.run(scenario())
    assert not idle_while_preparing  # a shutdown would otherwise stop the batcher under the call
    assert drained and answer == ["prepared"]


def test_one_tenants_flood_delays_another_tenants_request_by_one_model_call_in_the_dispatcher() -> None:
    async def scenario() -> list[list[str]]:
        model = _RecordingModel()
        embedded = EmbeddedRouteClassifier(model, 30.0, BatcherMetrics(CollectorRegistry(), "test"))  # type: ignore[arg-type]
        embedded._batcher._max_batch = 8
        embedded.start()
        try:
            first = asyncio.ensure_future(embedded.classify([("user", "flood-first")], None, caller="flooder"))
            await _until(model.entered.is_set, "the first call to enter the model")
            flood = [asyncio.ensure_future(embedded.classify([("user", f"flood{i}")], None, caller="flooder"))
                     for i in range(200)]
            await _until(lambda: embedded._batcher.queued("unary") == 200, "the flood to queue")
            other = asyncio.ensure_future(embedded.classify([("user", "other")], None, caller="search"))
            await _until(lambda: embedded._batcher.queued("unary") == 201, "the other tenant's request to queue")
            model.release.set()
            await asyncio.gather(first, other, *flood)
        finally:
            model.release.set()
            await embedded.close()
        return model.calls

    calls = asyncio.run(scenario())
    # Tenants take turns in the embedded model's queue: first come first served would have run the other
    # tenant's prompt 25 model calls later, past a 20 ms deadline under a flood, onto the fallback tier.
    assert any("other" in prompt for prompt in calls[1]), calls[:3]
