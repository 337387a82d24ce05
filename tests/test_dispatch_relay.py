"""Answers relayed as they come: streams chunk for chunk, huge bodies not held, breaks the caller sees."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
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


def test_a_stream_cut_mid_event_ends_with_an_error_event_the_sdk_reads(
        dispatcher: Dispatcher, fresh: dict[str, Upstream], tmp_path: Path) -> None:
    # The upstream dies after the first bytes of an event: relayed as they came, they would join the
    # error event into one line that is not JSON, and the caller would see a decoding error, not why.
    fresh["small"].behaviour = "break_mid_event"
    events, _ = streamed_events(dispatcher.base_url, "promptier/tier/small", EASY, timeout=10)
    assert [json.loads(event).get("error", {}).get("code") for event in events] == [None, None, "stream_interrupted"]
    stream = dispatcher.client().chat.completions.create(
        model="promptier/tier/small", messages=[{"role": "user", "content": EASY}], stream=True)
    pieces = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            pieces.append(chunk.choices[0].delta.content)
    assert pieces == ["small-0 ", "small-1 "] and "broke" in info.value.message
    assert [entry["status"] for entry in read_log_once_written(tmp_path, 2)] == [599, 599]


def test_a_stream_the_caller_read_to_its_end_is_logged_answered(
        dispatcher: Dispatcher, fresh: dict[str, Upstream], tmp_path: Path) -> None:
    # OpenAI's SDK closes the connection as soon as it has read `data: [DONE]`, without waiting for the
    # end of the body: a caller that got the whole answer has not left it unfinished.
    fresh["small"].behaviour = "linger"
    stream = dispatcher.client().chat.completions.create(
        model="promptier/tier/small", messages=[{"role": "user", "content": EASY}], stream=True,
        stream_options={"include_usage": True})
    assert [chunk.usage.total_tokens for chunk in stream if chunk.usage] == [17]
    (entry,) = read_log_once_written(tmp_path, 1)
    assert entry["status"] == 200 and entry["usage"]["total_tokens"] == 17 and entry["note"] is None
    metrics = httpx.get(f"http://127.0.0.1:{dispatcher.port}/metrics").text
    assert 'promptier_dispatch_requests_total{reason="pinned",status="200",tier="small"} 1.0' in metrics


def test_event_framer_relays_whole_events_and_sees_the_end() -> None:
    from serving.dispatch.stream_meter import MAX_EVENT_BYTES, EventFramer

    framer = EventFramer()
    assert framer.feed(b'data: {"a": 1}\n\ndata: {"b"') == b'data: {"a": 1}\n\n'  # the half event waits
    assert framer.feed(b': 2}\r\n\r\ndata: [DO') == b'data: {"b": 2}\r\n\r\n' and not framer.done
    assert framer.feed(b"NE]\n\n") == b"data: [DONE]\n\n" and framer.done
    assert framer.finish() == b""
    body = EventFramer()  # not an event stream (a JSON error to a streamed request): all of it, at the end
    assert body.feed(b'{"error": {"message": "no"}}') == b"" and body.finish() == b'{"error": {"message": "no"}}'
    blob = b"x" * (MAX_EVENT_BYTES + 1)  # more than an event may hold: relayed as it comes
    assert EventFramer().feed(blob) == blob
    # Whatever the chunking, every byte goes out once, in order, whole events at a time.
    stream = b'data: {"a": 1}\r\n\r\n: ping\n\ndata: {"b":\ndata: 2}\n\ndata: [DONE]\n\n'
    for size in (1, 2, 3, 5, 7):
        framer = EventFramer()
        pieces = [framer.feed(stream[i:i + size]) for i in range(0, len(stream), size)]
        assert b"".join(pieces) + framer.finish() == stream and framer.done
        assert all(piece.endswith((b"\n\n", b"\r\n\r\n")) for piece in pieces if piece)
    # The end is `[DONE]` as an event's whole data, and stays seen once seen.
    framer = EventFramer()
    assert framer.feed(b"data: {}\ndata: [DONE]\n\n") and not framer.done
    framer.feed(b"data: [DONE]\n\n: ping\n\n")
    assert framer.done


def test_an_answer_cut_before_it_was_relayed_names_its_tier_as_failed(
        dispatcher: Dispatcher, fresh: dict[str, Upstream], tmp_path: Path) -> None:
    # Under the size held whole, nothing of the answer has reached the caller when the upstream breaks:
    # a 502 that, as every answer after an upstream failure, says which tier failed.
    fresh["small"].behaviour, fresh["small"].huge_mb = "huge_break", 2
    with pytest.raises(openai.APIStatusError) as info:
        dispatcher.client().chat.completions.create(model="promptier/tier/small",
                                                    messages=[{"role": "user", "content": EASY}])
    headers = info.value.response.headers
    assert info.value.status_code == 502 and headers["x-promptier-failed-tiers"] == "small"
    (entry,) = read_log_once_written(tmp_path, 1)
    assert entry["status"] == 502 and entry["failed_tiers"] == ["small"]
    assert entry["tier"] is None  # no tier answered, as when every upstream fails before its first byte
