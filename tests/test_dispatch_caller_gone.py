"""Callers that leave before their answer is done: the upstream work stops, nothing escalates, the log says 499."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.dispatcher_harness import Dispatcher, dispatcher_config, read_log, read_log_once_written
from tests.fake_upstream import Upstream
from tests.grpc_server import EASY, ServerThread


def test_client_disconnect_cancels_upstream(dispatcher: Dispatcher, fresh: dict[str, Upstream],
                                           tmp_path: Path) -> None:
    fresh["small"].behaviour = "slowstream"
    with httpx.stream("POST", f"{dispatcher.base_url}/chat/completions", timeout=10,
                      json={"model": "promptier", "stream": True,
                            "messages": [{"role": "user", "content": EASY}]}) as response:
        next(response.iter_bytes())
    assert fresh["small"].cancelled.wait(5)
    (entry,) = read_log_once_written(tmp_path, 1)
    assert entry["status"] == 499  # the caller left mid-stream; the log says so instead of 200


@pytest.mark.parametrize("stream", [False, True])
def test_client_gone_before_the_upstream_answers_cancels_it_without_escalating(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path, stream: bool) -> None:
    # A caller that gives up while the upstream is still working (a long non-streaming completion, or
    # a stream whose first token has not come) must stop that work, and must not be escalated to a
    # dearer tier when the first-byte timeout later expires.
    config = dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl")
    config.tiers["small"].first_byte_timeout_s = 1.5
    running = Dispatcher(config)
    fresh["small"].behaviour = "generating"
    try:
        with pytest.raises(openai.APITimeoutError):  # the caller gives up and closes its connection
            running.client(timeout=0.4).chat.completions.create(
                model="promptier", stream=stream, messages=[{"role": "user", "content": EASY}])
        assert fresh["small"].cancelled.wait(1.0)  # well before the dispatcher's own 1.5 s timeout
        read_log_once_written(tmp_path, 1)
        time.sleep(1.5)  # past the first-byte timeout: an escalation would have reached medium by now
        (entry,) = read_log(tmp_path)
        assert entry["status"] == 499 and entry["tier"] == "small"
        assert not fresh["medium"].received and not fresh["large"].received
        metrics = httpx.get(f"http://127.0.0.1:{running.port}/metrics/").text
        assert 'promptier_dispatch_requests_total{reason="classified",status="499",tier="small"} 1.0' in metrics
        assert "promptier_dispatch_escalations_total{" not in metrics
    finally:
        running.stop()


def test_a_caller_leaving_during_an_escalation_is_logged_where_it_left(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path) -> None:
    # small fails, medium is at work when the caller gives up: the line says the request was escalated,
    # that small failed, and that medium (not small) was the tier at work; nothing goes on to large.
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl"))
    fresh["small"].behaviour, fresh["medium"].behaviour = "500", "generating"

    async def leave_once_medium_works() -> None:
        # On an event, not a timer: a busy machine cannot make the caller leave before medium is asked.
        async with httpx.AsyncClient(base_url=running.base_url, timeout=60) as client:
            call = asyncio.create_task(client.post("/chat/completions", json={
                "model": "promptier", "messages": [{"role": "user", "content": EASY}]}))
            for _ in range(1500):
                if fresh["medium"].received:
                    break
                await asyncio.sleep(0.02)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    try:
        asyncio.run(leave_once_medium_works())
        assert fresh["medium"].received and fresh["medium"].cancelled.wait(10.0)
        (entry,) = read_log_once_written(tmp_path, 1)
        assert (entry["status"], entry["tier"], entry["routed_tier"], entry["reason"], entry["failed_tiers"]) == (
            499, "medium", "small", "escalated", ["small"])
        assert not fresh["large"].received
        metrics = httpx.get(f"http://127.0.0.1:{running.port}/metrics/").text
        assert 'promptier_dispatch_requests_total{reason="escalated",status="499",tier="medium"} 1.0' in metrics
    finally:
        running.stop()


def test_callers_leaving_and_staying_at_once(dispatcher: Dispatcher, fresh: dict[str, Upstream],
                                             tmp_path: Path) -> None:
    # 24 concurrent callers of a long generation, every other one leaving once the upstream has all 24:
    # those that stay get their answer, each one that left stops its own generation and nobody else's,
    # and the decision log has every request once, with the status each one ended with. The callers
    # leave on events, not on timers, so a busy machine cannot reorder them.
    fresh["small"].behaviour, fresh["small"].generation_s = "generating", 60.0

    async def until(condition: Callable[[], bool], what: str) -> None:
        for _ in range(1500):
            if condition():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting until {what}")

    async def run() -> list[object]:
        async with httpx.AsyncClient(base_url=dispatcher.base_url, timeout=60) as client:
            async def call(index: int) -> int:
                body = {"model": "promptier", "stream": index % 4 in (0, 1),
                        "messages": [{"role": "user", "content": EASY}]}
                return (await client.post("/chat/completions", json=body)).status_code

            tasks = [asyncio.create_task(call(index)) for index in range(24)]
            await until(lambda: len(fresh["small"].received) == 24, "the upstream has every request")
            for index in range(1, 24, 2):
                tasks[index].cancel()
            await until(lambda: fresh["small"].generations_cancelled == 12, "the 12 generations stopped")
            fresh["small"].finish.set()
            return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(run())
    assert ["left" if isinstance(o, asyncio.CancelledError) else o for o in outcomes] == \
        ["left" if index % 2 else 200 for index in range(24)]
    entries = read_log_once_written(tmp_path, 24)
    assert fresh["small"].generations_cancelled == 12 and len(fresh["small"].received) == 24
    assert sorted(entry["status"] for entry in entries) == [200] * 12 + [499] * 12
    assert not fresh["medium"].received and not fresh["large"].received
