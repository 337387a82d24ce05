"""Answers relayed as they come: streams chunk for chunk, huge bodies not held, breaks the caller sees."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.dispatcher_harness import Dispatcher, read_log_once_written, streamed_events, wait_for_health
from tests.fake_upstream import Upstream, huge_answer
from tests.grpc_server import EASY, ServerThread, spawned_workers


def test_streaming_is_relayed_chunk_for_chunk(dispatcher: Dispatcher, tmp_path: Path) -> None:
    stream = dispatcher.client().chat.completions.create(
        model="promptier", messages=[{"role": "user", "content": EASY}], stream=True)
    pieces = [chunk.choices[0].delta.content for chunk in stream]
    assert pieces == [f"small-{i} " for i in range(5)]
    with_usage = dispatcher.client().chat.completions.create(
        model="promptier", messages=[{"role": "user", "content": EASY}], stream=True,
        stream_options={"include_usage": True})
    assert [chunk.usage.total_tokens for chunk in with_usage if chunk.usage] == [17]
    without, with_ = read_log_once_written(tmp_path, 2)  # a stream is logged after its last byte has gone
    assert without["usage"] is None and without["cost_usd"] is None and without["status"] == 200
    # The caller asked for usage, so the stream's last chunk carries it: the log gets tokens and cost too.
    assert with_["usage"]["total_tokens"] == 17 and with_["cost_usd"] == pytest.approx((12 * 0.2 + 5 * 0.2) / 1e6)


def test_a_huge_answer_is_relayed_as_it_comes_not_held_in_memory(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path) -> None:
    import hashlib
    import os
    import subprocess
    import sys

    import psutil

    from serving.bench.ports import free_port

    log_path, config = tmp_path / "decisions.jsonl", tmp_path / "dispatcher.yaml"
    config.write_text(json.dumps({
        "classifier": {"address": grpc_classifier.target},
        "tiers": {name: {"base_url": u.url, "model": f"{name}-upstream-model"} for name, u in fresh.items()},
        "fallback_tier": "large", "decision_log": {"path": str(log_path)}}))
    port = free_port()
    parent = subprocess.Popen([sys.executable, "-m", "classifier.cli", "dispatch", "--config", str(config),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"})
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {"model": "promptier/tier/small", "messages": [{"role": "user", "content": EASY}]}
    try:
        wait_for_health(port, parent)
        (worker,) = spawned_workers(parent.pid)
        for _ in range(3):  # the request path warmed up, so that what grows next is the answer's doing
            httpx.post(url, json=body, timeout=30).raise_for_status()
        before = worker.memory_info().rss
        fresh["small"].behaviour, fresh["small"].huge_mb = "huge", 80
        head, block, tail = huge_answer("small-upstream-model", 80)
        expected = hashlib.sha256(head)
        for _ in range(80):
            expected.update(block)
        expected.update(tail)
        size = len(head) + 80 * len(block) + len(tail)
        received, digest, peak, next_sample = 0, hashlib.sha256(), before, 0
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                received += len(chunk)
                digest.update(chunk)
                if received >= next_sample:  # the worker's memory, every 2 MiB of the answer
                    peak = max(peak, worker.memory_info().rss)
                    next_sample += 2 << 20
        assert received == size and digest.hexdigest() == expected.hexdigest()  # intact, to the last byte
        growth = peak - before  # about the 4 MiB the dispatcher reads before it knows the answer is large
        assert growth < size / 4, f"the dispatcher grew by {growth / 2**20:.0f} MiB relaying {size / 2**20:.0f} MiB"
        entry = read_log_once_written(tmp_path, 4)[-1]
        assert entry["status"] == 200 and entry["usage"] is None and "over" in entry["note"]
    finally:
        parent.terminate()
        try:
            parent.wait(30)
        except subprocess.TimeoutExpired:
            for process in [*spawned_workers(parent.pid), parent]:
                process.kill()
        psutil.wait_procs([parent], timeout=5)


def test_a_huge_answer_cut_by_its_upstream_reaches_the_caller_incomplete(
        dispatcher: Dispatcher, fresh: dict[str, Upstream], tmp_path: Path) -> None:
    # Relayed as it comes, the answer has started when the upstream breaks: a JSON body cannot carry an
    # error event, so the caller's connection is closed before the end of the body, which it sees.
    fresh["small"].behaviour, fresh["small"].huge_mb = "huge_break", 12
    body = {"model": "promptier/tier/small", "messages": [{"role": "user", "content": EASY}]}
    received = 0
    with pytest.raises(httpx.RemoteProtocolError), \
            httpx.stream("POST", f"{dispatcher.base_url}/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += len(chunk)
    assert 4 << 20 < received < 12 << 20
    (entry,) = read_log_once_written(tmp_path, 1)
    assert entry["status"] == 599 and entry["usage"] is None
    fresh["small"].behaviour = "ok"
    assert dispatcher.client().chat.completions.create(model="promptier/tier/small",
                                                       messages=body["messages"]).choices


def test_broken_stream_ends_with_error_event(dispatcher: Dispatcher, fresh: dict[str, Upstream]) -> None:
    fresh["small"].behaviour = "break"
    events, _ = streamed_events(dispatcher.base_url, "promptier", EASY, timeout=10)
    assert len(events) == 3  # two chunks, then the error event; no [DONE]
    assert json.loads(events[-1])["error"]["code"] == "stream_interrupted"
