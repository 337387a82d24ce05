"""The micro-batcher's turns between the unary and batch lanes, on a model that records its calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from serving.common.batcher import Batcher, BatcherMetrics


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


def test_a_stream_of_unary_calls_cannot_starve_a_batch_call() -> None:
    async def scenario() -> list[list[str]]:
        model = _RecordingModel()
        batcher = Batcher(lambda: model, BatcherMetrics(CollectorRegistry(), "test"),  # type: ignore[arg-type,return-value]
                          max_queue=1000, max_batch=8, max_batch_queue=1000)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit([("u-first", None)], timeout=None))
            await _until(model.entered.is_set, "the first call to enter the model")
            batch = asyncio.ensure_future(batcher.submit([(f"b{i}", None) for i in range(20)], timeout=None,
                                                         lane="batch"))
            unary = [asyncio.ensure_future(batcher.submit([(f"u{i}", None)], timeout=None)) for i in range(80)]
            await _until(lambda: batcher.queued("batch") == 20 and batcher.queued("unary") == 80, "all queued")
            model.release.set()
            await asyncio.gather(first, batch, *unary)
            return model.calls
        finally:
            model.release.set()
            await batcher.stop()

    calls = asyncio.run(scenario())
    kinds = ["batch" if call[0].startswith("b") else "unary" for call in calls]
    # The held call was unary; then turns alternate while both lanes have work: the batch call's three
    # chunks are done by the sixth call, not after the 80 unary prompts queued beside it.
    assert kinds[:6] == ["unary", "batch", "unary", "batch", "unary", "batch"], kinds
    assert all(len(call) <= 8 for call in calls)
    assert all(prompt.startswith("u") for call in calls if call[0].startswith("u") for prompt in call)
