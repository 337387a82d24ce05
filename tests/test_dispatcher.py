"""The dispatcher driven by the official openai SDK against recording upstream servers on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from classifier.conversation import render_conversation
from classifier.errors import PromptierError
from serving.dispatch.decision_log import DECISION_SCHEMA_VERSION
from serving.dispatch.dispatch_config import ClassifierEndpoint, ConfigError, DispatcherConfig, load_dispatcher_config
from serving.dispatch.dispatch_supervisor import WORKER_START_TIMEOUT_S
from serving.dispatch.dispatcher import create_app
from serving.dispatch.upstream_body import usage_from_stream_tail
from tests.dispatcher_harness import Dispatcher, dispatcher_config, wait_for_health
from tests.fake_upstream import MISSING, USAGE, Upstream, huge_answer
from tests.grpc_server import EASY, HARD, ServerThread, spawned_workers, worker_serving


@pytest.fixture
def dispatcher(fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path) -> Iterator[Dispatcher]:
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl"))
    yield running
    running.stop()


@pytest.fixture
def fresh_dispatcher(fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path
                     ) -> Iterator[Callable[..., Dispatcher]]:
    """Starts dispatchers with config fields of the test's own (each logs to its own file)."""
    started: list[Dispatcher] = []

    def start(**extra: object) -> Dispatcher:
        started.append(Dispatcher(dispatcher_config(fresh, grpc_classifier.target,
                                                    tmp_path / f"decisions-{len(started)}.jsonl", **extra)))
        return started[-1]

    yield start
    for running in started:
        running.stop()


def _log(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]


def _log_once_written(tmp_path: Path, lines: int, wait_s: float = 5.0) -> list[dict]:
    """The decision log once it has `lines` lines (or what it has after `wait_s`): streams, and requests
    whose caller left, are recorded after the response is gone."""
    deadline = time.time() + wait_s
    while time.time() < deadline and (not (tmp_path / "decisions.jsonl").exists() or len(_log(tmp_path)) < lines):
        time.sleep(0.05)
    return _log(tmp_path)


def test_routes_by_tier_and_passes_body_through(dispatcher: Dispatcher, fresh: dict[str, Upstream],
                                                 tmp_path: Path) -> None:
    client = dispatcher.client()
    raw = client.chat.completions.with_raw_response.create(
        model="promptier", messages=[{"role": "user", "content": EASY}], temperature=0.3, max_tokens=7)
    completion = raw.parse()
    assert completion.choices[0].message.content == "answer from small"
    assert raw.headers["x-promptier-tier"] == "small" and raw.headers["x-promptier-reason"] == "classified"
    assert raw.headers["x-promptier-upstream-model"] == "small-upstream-model"
    assert 0 < float(raw.headers["x-promptier-confidence"]) <= 1
    assert raw.headers["x-promptier-decided-by"] == "model"  # the fixture model measures no familiarity
    sent = fresh["small"].received[0]["body"]
    assert sent["model"] == "small-upstream-model" and sent["temperature"] == 0.3 and sent["max_tokens"] == 7
    hard = client.chat.completions.with_raw_response.create(model="promptier/quality",
                                                           messages=[{"role": "user", "content": HARD}])
    assert hard.headers["x-promptier-tier"] == "large" and hard.headers["x-promptier-mode"] == "quality"
    entries = _log(tmp_path)
    assert [e["tier"] for e in entries] == ["small", "large"]
    assert entries[0]["prompt"] == EASY and entries[0]["usage"]["total_tokens"] == 15
    assert entries[0]["cost_usd"] == pytest.approx((10 * 0.2 + 5 * 0.2) / 1e6)
    assert {"prompt_id", "model", "score", "source", "category", "reason", "latency_ms", "status"} <= set(entries[0])
    assert entries[0]["schema_version"] == DECISION_SCHEMA_VERSION and entries[0]["decided_by"] == "model"


def test_decision_log_with_scores_is_training_input(dispatcher: Dispatcher, tmp_path: Path) -> None:
    # The loop the dispatcher exists for: route, have a judge fill in `score`, train on the result.
    from training.data import read_logs
    from training.labels import build_table
    from training.pool import Pool

    client = dispatcher.client()
    client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
    client.chat.completions.create(model="promptier/tier/large", messages=[{"role": "user", "content": EASY}])
    conversation = [("system", "Be brief."), ("user", EASY), ("assistant", "Done."), ("user", HARD)]
    client.chat.completions.create(model="promptier/quality",
                                   messages=[{"role": role, "content": text} for role, text in conversation])
    client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": "not judged yet"}])
    logged = _log(tmp_path)
    # For a judge, a conversation is also kept as it was, in order; a single message is the prompt itself.
    assert logged[2]["messages"] == [{"role": role, "content": text} for role, text in conversation]
    assert logged[0]["messages"] is None
    judged = tmp_path / "judged.jsonl"
    scores = [0.0, 1.0, 1.0, None]  # the small model failed the easy prompt; the last row awaits its judge
    judged.write_text("".join(json.dumps({**entry, "score": score}) + "\n"
                              for entry, score in zip(_log(tmp_path), scores, strict=True)))
    rows, skipped = read_logs([judged])
    # The row without a score is waiting for one: left out and counted, not an invalid row.
    assert skipped.total == 0 and skipped.not_trainable == {"no outcome reported yet": 1}
    assert "1 x no outcome reported yet" in skipped.summary()
    pool = Pool.model_validate({
        "tiers": [{"name": name, "usd_per_mtok": {"input": 1, "output": 1}} for name in ("small", "medium", "large")],
        "sources": {"dispatcher": {name: f"{name}-upstream-model" for name in ("small", "medium", "large")}}})
    table, unused = build_table(rows, pool)
    # A conversation is logged as the text the classifier read, so training sees what serving sees.
    assert not unused and table.prompts == [EASY, render_conversation(conversation)]
    easy, hard = table.targets
    assert easy[0] == 0.0 and easy[2] == 1.0 and np.isnan(easy[1])  # unrouted tiers stay unknown, not failures
    assert hard[2] == 1.0 and np.isnan(hard[:2]).all()


def test_pinning_models_listing_and_health(dispatcher: Dispatcher, fresh: dict[str, Upstream]) -> None:
    client = dispatcher.client()
    pinned = client.chat.completions.with_raw_response.create(
        model="promptier/tier/medium", messages=[{"role": "user", "content": EASY}])
    assert pinned.headers["x-promptier-tier"] == "medium" and pinned.headers["x-promptier-reason"] == "pinned"
    # Nothing was classified: no empty or made-up classification headers.
    assert not {"x-promptier-confidence", "x-promptier-mode", "x-promptier-decided-by"} & set(pinned.headers)
    ids = {model.id for model in client.models.list()}
    assert {"promptier", "promptier/balanced", "promptier/cost", "promptier/tier/small"} <= ids
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    health = httpx.get(f"http://127.0.0.1:{dispatcher.port}/health").json()
    assert health["classifier"] == "serving"
    deadline = time.monotonic() + 10
    while health["classifier_processes_reached"] is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the dispatcher spreads its 2 connections in the background
        health = httpx.get(f"http://127.0.0.1:{dispatcher.port}/health").json()
    assert health["classifier_processes_reached"] == 1  # the test service is a single process


def test_streaming_is_relayed_chunk_for_chunk(dispatcher: Dispatcher, tmp_path: Path) -> None:
    stream = dispatcher.client().chat.completions.create(
        model="promptier", messages=[{"role": "user", "content": EASY}], stream=True)
    pieces = [chunk.choices[0].delta.content for chunk in stream]
    assert pieces == [f"small-{i} " for i in range(5)]
    with_usage = dispatcher.client().chat.completions.create(
        model="promptier", messages=[{"role": "user", "content": EASY}], stream=True,
        stream_options={"include_usage": True})
    assert [chunk.usage.total_tokens for chunk in with_usage if chunk.usage] == [17]
    without, with_ = _log_once_written(tmp_path, 2)  # a stream is logged after its last byte has gone
    assert without["usage"] is None and without["cost_usd"] is None and without["status"] == 200
    # The caller asked for usage, so the stream's last chunk carries it: the log gets tokens and cost too.
    assert with_["usage"]["total_tokens"] == 17 and with_["cost_usd"] == pytest.approx((12 * 0.2 + 5 * 0.2) / 1e6)


def test_async_client(dispatcher: Dispatcher) -> None:
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=dispatcher.base_url, api_key="unused", max_retries=0)
        replies = await asyncio.gather(*(client.chat.completions.create(
            model="promptier", messages=[{"role": "user", "content": text}]) for text in (EASY, HARD, EASY)))
        await client.close()
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(run()) == ["answer from small", "answer from large", "answer from small"]


def test_upstream_5xx_and_timeout_escalate_never_downgrade(dispatcher: Dispatcher, fresh: dict[str, Upstream],
                                                           tmp_path: Path) -> None:
    client = dispatcher.client()
    fresh["small"].behaviour = "500"
    raw = client.chat.completions.with_raw_response.create(model="promptier",
                                                           messages=[{"role": "user", "content": EASY}])
    assert raw.headers["x-promptier-tier"] == "medium" and raw.headers["x-promptier-reason"] == "escalated"
    fresh["medium"].behaviour = "slow"
    raw = client.chat.completions.with_raw_response.create(model="promptier",
                                                           messages=[{"role": "user", "content": EASY}])
    assert raw.headers["x-promptier-tier"] == "large"
    fresh["large"].behaviour = "500"
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="promptier/tier/large", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502
    assert len(fresh["small"].received) == 2 and len(fresh["large"].received) == 2  # never retried downwards
    assert _log(tmp_path)[-1]["status"] == 502


def test_upstream_4xx_goes_back_as_it_came(dispatcher: Dispatcher, fresh: dict[str, Upstream]) -> None:
    fresh["small"].behaviour = "400"
    with pytest.raises(openai.BadRequestError) as info:
        dispatcher.client().chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
    assert "bad temperature" in str(info.value)
    assert not fresh["medium"].received  # a caller's error is not retried elsewhere


UNREADABLE_USAGE = {
    "null counts": ({"prompt_tokens": None, "completion_tokens": None, "total_tokens": None},
                    "usage.prompt_tokens is null or missing, not a token count"),
    "string counts": ({"prompt_tokens": "10", "completion_tokens": "5", "total_tokens": "15"},
                      "usage.prompt_tokens is a string, not a token count"),
    "a number": (15, "usage is a number, not an object"),
    "a string": ("garbage", "usage is a string, not an object"),
    "a negative count": ({"prompt_tokens": 10, "completion_tokens": -5}, "usage.completion_tokens is -5"),
    "missing": (MISSING, "no usage"),
}


@pytest.mark.parametrize("stream", [False, True])
def test_answers_with_unreadable_usage_are_relayed_and_logged_without_cost(
        dispatcher: Dispatcher, fresh: dict[str, Upstream], tmp_path: Path, stream: bool) -> None:
    # The upstream answered (and was paid): what it says in `usage` must not turn that into an error.
    url = f"{dispatcher.base_url}/chat/completions"
    body = {"model": "promptier/tier/small", "messages": [{"role": "user", "content": EASY}], "stream": stream,
            "stream_options": {"include_usage": True}} if stream else \
        {"model": "promptier/tier/small", "messages": [{"role": "user", "content": EASY}]}
    for count, (usage, note) in enumerate(UNREADABLE_USAGE.values(), start=1):
        fresh["small"].usage = usage
        if stream:
            with httpx.stream("POST", url, json=body, timeout=10) as response:
                status, text = response.status_code, "".join(response.iter_text())
            events = _data_events(text)
            assert events[-1] == "[DONE]", text  # the stream was relayed to its end
            last = json.loads(events[-2])
            relayed = last.get("usage", MISSING)
            assert len(events) == 7 and "error" not in last
        else:
            reply = httpx.post(url, json=body, timeout=10)
            status, relayed = reply.status_code, reply.json().get("usage", MISSING)
            assert reply.json()["choices"][0]["message"]["content"] == "answer from small"
        assert status == 200
        assert relayed == usage  # as the upstream sent it
        entry = _log_once_written(tmp_path, count)[-1]
        assert (entry["status"], entry["tier"], entry["usage"], entry["cost_usd"]) == (200, "small", None, None)
        assert note in entry["note"], entry["note"]
    fresh["small"].usage = USAGE
    httpx.post(url, json=body, timeout=10).raise_for_status()
    entry = _log_once_written(tmp_path, len(UNREADABLE_USAGE) + 1)[-1]
    assert entry["cost_usd"] > 0 and entry["note"] is None


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
        entry = _log_once_written(tmp_path, 4)[-1]
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
    (entry,) = _log_once_written(tmp_path, 1)
    assert entry["status"] == 599 and entry["usage"] is None
    fresh["small"].behaviour = "ok"
    assert dispatcher.client().chat.completions.create(model="promptier/tier/small",
                                                       messages=body["messages"]).choices


def _data_events(text: str) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


def test_broken_stream_ends_with_error_event(dispatcher: Dispatcher, fresh: dict[str, Upstream]) -> None:
    fresh["small"].behaviour = "break"
    with httpx.stream("POST", f"{dispatcher.base_url}/chat/completions", timeout=10,
                      json={"model": "promptier", "stream": True,
                            "messages": [{"role": "user", "content": EASY}]}) as response:
        text = "".join(response.iter_text())
    events = _data_events(text)
    assert len(events) == 3  # two chunks, then the error event; no [DONE]
    assert json.loads(events[-1])["error"]["code"] == "stream_interrupted"


def test_client_disconnect_cancels_upstream(dispatcher: Dispatcher, fresh: dict[str, Upstream],
                                           tmp_path: Path) -> None:
    fresh["small"].behaviour = "slowstream"
    with httpx.stream("POST", f"{dispatcher.base_url}/chat/completions", timeout=10,
                      json={"model": "promptier", "stream": True,
                            "messages": [{"role": "user", "content": EASY}]}) as response:
        next(response.iter_bytes())
    assert fresh["small"].cancelled.wait(5)
    (entry,) = _log_once_written(tmp_path, 1)
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
        _log_once_written(tmp_path, 1)
        time.sleep(1.5)  # past the first-byte timeout: an escalation would have reached medium by now
        (entry,) = _log(tmp_path)
        assert entry["status"] == 499 and entry["tier"] == "small"
        assert not fresh["medium"].received and not fresh["large"].received
        metrics = httpx.get(f"http://127.0.0.1:{running.port}/metrics/").text
        assert 'promptier_dispatch_requests_total{reason="classified",status="499",tier="small"} 1.0' in metrics
        assert "promptier_dispatch_escalations_total{" not in metrics
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
    entries = _log_once_written(tmp_path, 24)
    assert fresh["small"].generations_cancelled == 12 and len(fresh["small"].received) == 24
    assert sorted(entry["status"] for entry in entries) == [200] * 12 + [499] * 12
    assert not fresh["medium"].received and not fresh["large"].received


def test_classifier_down_or_slow_falls_back(fresh: dict[str, Upstream], trained_artifact: Path,
                                            tmp_path: Path) -> None:
    classifier_server = ServerThread(model_dir=trained_artifact)
    running = Dispatcher(dispatcher_config(fresh, classifier_server.target, tmp_path / "decisions.jsonl"))
    try:
        client = running.client()
        first = client.chat.completions.with_raw_response.create(model="promptier",
                                                                 messages=[{"role": "user", "content": EASY}])
        assert first.headers["x-promptier-reason"] == "classified"
        classifier_server.stop()  # killed mid-run
        started = time.perf_counter()
        second = client.chat.completions.with_raw_response.create(model="promptier",
                                                                  messages=[{"role": "user", "content": EASY}])
        assert time.perf_counter() - started < 3  # never hangs on the classifier
        assert second.headers["x-promptier-reason"] == "fallback" and second.headers["x-promptier-tier"] == "large"
        metrics = httpx.get(f"http://127.0.0.1:{running.port}/metrics/").text
        assert 'promptier_dispatch_classifier_fallbacks_total{cause="UNAVAILABLE"} 1.0' in metrics
        assert "unavailable" in httpx.get(f"http://127.0.0.1:{running.port}/health").json()["classifier"]
    finally:
        running.stop()


def test_bad_requests_and_inbound_keys(fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTIER_KEYS", "k1,k2")
    monkeypatch.setenv("SMALL_KEY", "secret-upstream-key")
    config = dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl",
                               inbound_api_keys_env="PROMPTIER_KEYS", max_request_bytes=4096)
    config.tiers["small"].api_key_env = "SMALL_KEY"
    running = Dispatcher(config)
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").chat.completions.create(model="promptier",
                                                                    messages=[{"role": "user", "content": "hi"}])
        client = running.client(api_key="k2")
        client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
        assert fresh["small"].received[-1]["authorization"] == "Bearer secret-upstream-key"
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": "x" * 5000}])
        assert info.value.status_code == 413
        url = f"{running.base_url}/chat/completions"
        auth = {"authorization": "Bearer k1", "content-type": "application/json"}
        assert httpx.post(url, content=b"{not json", headers=auth).status_code == 400
        assert httpx.post(url, json={"model": "promptier", "messages": []}, headers=auth).status_code == 400
        assert httpx.post(url, json={"model": "promptier", "messages": "hi"}, headers=auth).status_code == 400
        assert httpx.post(url, content=b"\xff\xfe", headers=auth).status_code == 400
        log_text = (tmp_path / "decisions.jsonl").read_text()
        assert "secret-upstream-key" not in log_text and "k2" not in log_text
    finally:
        running.stop()


def _until_closed(connection: socket.socket) -> bytes:
    """What the server sends until it closes the connection. The socket's timeout bounds the wait (a
    server that never closes fails the test); it measures nothing."""
    received = b""
    while True:
        try:
            chunk = connection.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def _slow_client(port: int, sent: bytes) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(sent)
    return connection


HEADERS = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
           b"content-length: 400\r\n\r\n")


def test_slow_clients_are_cut_off_and_others_keep_being_served(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path) -> None:
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl",
                                           inbound={"header_timeout_s": 0.5, "body_timeout_s": 0.5}))
    try:
        slow = {"silent": _slow_client(running.port, b""),
                "half the headers": _slow_client(running.port, HEADERS[:40]),
                "half the body": _slow_client(running.port, HEADERS + b'{"model": "promptier", ' * 8)}
        client = running.client()
        for _ in range(3):  # meanwhile, callers that send their requests are served
            client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
        answers = {}
        for what, connection in slow.items():
            answers[what] = _until_closed(connection)
            connection.close()
        assert answers.pop("silent") == b""  # closed quietly, like an idle keep-alive connection
        for what, answer in answers.items():
            assert answer.startswith(b"HTTP/1.1 408 "), (what, answer)
        # Trickling does not extend the deadline: a byte at a time, each within the timeout, still ends.
        trickler = _slow_client(running.port, b"")
        trickler.settimeout(0.05)
        answer = b""
        for byte in (HEADERS[:-4] + b"\r\nx-padding: " + b"a" * 2000)[:2000]:
            try:
                trickler.sendall(bytes([byte]))
                answer = trickler.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            break
        trickler.settimeout(30)
        answer += _until_closed(trickler)
        trickler.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        # A keep-alive connection between requests is not cut by the request deadlines.
        with httpx.Client(base_url=running.base_url) as keep_alive:
            for _ in range(2):
                assert keep_alive.get("/models").status_code == 200
                time.sleep(0.7)
            assert keep_alive.get("/models").status_code == 200
        assert len(_log(tmp_path)) == 3  # the requests cut off never reached routing
    finally:
        running.stop()


def test_a_caller_that_leaves_mid_body_is_one_log_line_without_traceback(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl"))
    try:
        with caplog.at_level("INFO", logger="promptier.dispatcher"), caplog.at_level("INFO", logger="uvicorn"):
            for _ in range(2):
                _slow_client(running.port, HEADERS + b'{"model": "prom').close()

            def lines() -> list[logging.LogRecord]:
                return [record for record in caplog.records if "client_left" in record.getMessage()]

            deadline = time.monotonic() + 10
            while len(lines()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(lines()) == 2
            assert not [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]
        assert running.client().chat.completions.create(model="promptier",
                                                        messages=[{"role": "user", "content": EASY}]).choices
    finally:
        running.stop()


def test_connections_past_the_limit_are_refused_at_once(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path) -> None:
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl",
                                           inbound={"max_connections": 3, "header_timeout_s": 60}))
    try:
        held = [_slow_client(running.port, b"") for _ in range(3)]
        refused = _slow_client(running.port, b"")
        answer = _until_closed(refused)  # answered without waiting for a request
        refused.close()
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in answer, answer
        for connection in held:
            connection.close()
        status = None
        for _ in range(200):  # once the server has seen them go
            status = httpx.get(f"{running.base_url}/models").status_code
            if status == 200:
                break
            time.sleep(0.05)
        assert status == 200
    finally:
        running.stop()


def test_a_retiring_dispatcher_answers_the_connections_it_had_accepted(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker told to stop (SIGHUP's replacement, SIGTERM) still answers a request that reaches it on a
    connection it accepted before, then closes; a silent one is closed; and one whose request it has
    already answered (before reading all of its body) is closed at once instead of holding the
    shutdown open."""
    from serving.dispatch import inbound

    monkeypatch.setattr(inbound, "SHUTDOWN_GRACE_S", 10.0)  # the caller's request may come late on a busy machine
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl"))
    caller, silent = _slow_client(running.port, b""), _slow_client(running.port, b"")
    answered_early = _slow_client(running.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                 b"content-type: text/plain\r\ncontent-length: 20\r\n\r\n0123456789")
    assert answered_early.recv(65536).startswith(b"HTTP/1.1 415 ")  # answered without reading the rest
    connections = running.server.server_state.connections
    deadline = time.monotonic() + 30  # bounds the waits below; measures nothing
    while len(connections) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(connections) == 3
    running.stop()  # the graceful shutdown a retiring worker goes through
    while time.monotonic() < deadline:
        now = list(connections)
        if len(now) == 2 and all(getattr(c, "last_request", False) for c in now):
            break
        time.sleep(0.01)
    now = list(connections)
    assert len(now) == 2 and all(c.last_request for c in now)  # shutting down; the two waiting still open
    answered_early.sendall(b"0123456789")
    assert _until_closed(answered_early) == b""
    caller.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = _until_closed(caller)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"connection: close" in answer.lower(), answer
    assert _until_closed(silent) == b""
    while connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not connections  # nothing holds the shutdown open
    for connection in (caller, silent, answered_early):
        connection.close()


def test_malformed_bodies_are_400s_that_say_why(dispatcher: Dispatcher, fresh: dict[str, Upstream]) -> None:
    url = f"{dispatcher.base_url}/chat/completions"
    start = '{"model": "promptier", "messages": [{"role": "user", "content": "hi"}], '

    def post(rest: str) -> httpx.Response:
        return httpx.post(url, content=start + rest, headers={"content-type": "application/json"}, timeout=10)

    cases = {
        '"metadata": ' + "[" * 100_000 + "]" * 100_000 + "}": "nested too deeply",
        '"seed": ' + "7" * 5000 + "}": "number",
        '"temperature": NaN}': "NaN",
        '"temperature": 1e999}': "Out of range float",
        '"stream": "false"}': "stream must be true or false",
        '"stream": 0}': "stream must be true or false",
    }
    for rest, message in cases.items():
        reply = post(rest)
        assert reply.status_code == 400, (rest[:40], reply.status_code, reply.text[:200])
        assert message in reply.json()["error"]["message"], reply.json()
    assert not any(upstream.received for upstream in fresh.values())
    reply = post('"stream": null}')  # as the OpenAI API allows: not streamed
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]


def test_first_byte_timeout_is_not_cut_short_by_the_read_timeout(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path) -> None:
    config = dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl")
    config.tiers["small"].first_byte_timeout_s, config.tiers["small"].read_timeout_s = 10.0, 0.3
    running = Dispatcher(config)
    try:
        # A non-streaming answer comes whole after its generation: the first-byte timeout is the bound.
        fresh["small"].behaviour, fresh["small"].delay_s = "delay", 1.0
        reply = running.client().chat.completions.with_raw_response.create(
            model="promptier/tier/small", messages=[{"role": "user", "content": EASY}])
        assert reply.headers["x-promptier-tier"] == "small" and reply.headers["x-promptier-reason"] == "pinned"
        assert not fresh["medium"].received
        # Once the headers have come, the read timeout bounds each gap: a stream gone quiet is cut.
        fresh["small"].behaviour = "stall"
        with httpx.stream("POST", f"{running.base_url}/chat/completions", timeout=30,
                          json={"model": "promptier/tier/small", "stream": True,
                                "messages": [{"role": "user", "content": EASY}]}) as response:
            text = "".join(response.iter_text())
        events = _data_events(text)
        assert len(events) == 3 and json.loads(events[-1])["error"]["code"] == "stream_interrupted", text
    finally:
        running.stop()


def test_requests_a_browser_page_could_forge_are_refused_without_keys(
        dispatcher: Dispatcher, fresh: dict[str, Upstream], fresh_dispatcher: Callable[..., Dispatcher]) -> None:
    url = f"{dispatcher.base_url}/chat/completions"
    body = json.dumps({"model": "promptier", "messages": [{"role": "user", "content": EASY}]})
    # A cross-site form or fetch may send text/plain (or form data) with no preflight: not executed.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": content_type} if content_type else {}
        reply = httpx.post(url, content=body, headers=headers)
        assert reply.status_code == 415 and reply.json()["error"]["code"] == "unsupported_media_type"
    assert not fresh["small"].received
    assert httpx.post(url, content=body, headers={"content-type": "Application/JSON; charset=utf-8"}).status_code == 200
    # DNS rebinding: the page's own name, resolved to the dispatcher's address, arrives as Host.
    port = dispatcher.port
    for path in ("/v1/chat/completions", "/v1/models", "/health", "/metrics/"):
        headers = {"host": f"rebind.example:{port}", "content-type": "application/json"}
        reply = httpx.request("POST" if "chat" in path else "GET", f"http://127.0.0.1:{port}{path}",
                              content=body, headers=headers)
        assert reply.status_code == 403 and reply.json()["error"]["code"] == "host_not_allowed", path
    assert len(fresh["small"].received) == 1
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1", f"[::1]:{port}", f"10.1.2.3:{port}",
                 "LOCALHOST."):
        assert httpx.get(f"{dispatcher.base_url}/models", headers={"host": host}).status_code == 200, host
    # A name the operator serves the dispatcher under is listed in allowed_hosts.
    listed = fresh_dispatcher(allowed_hosts=["dispatcher.internal"])
    models = f"{listed.base_url}/models"
    assert httpx.get(models, headers={"host": f"dispatcher.internal:{listed.port}"}).status_code == 200
    assert httpx.get(models, headers={"host": "rebind.example"}).status_code == 403
    anything = fresh_dispatcher(allowed_hosts=["*"])
    assert httpx.get(f"{anything.base_url}/models", headers={"host": "rebind.example"}).status_code == 200


def test_config_validation(tmp_path: Path) -> None:
    path = tmp_path / "dispatcher.yaml"
    path.write_text("tiers: {small: {base_url: 'ftp://x', model: m}}\nfallback_tier: small\n")
    with pytest.raises(ConfigError, match=r"tiers.small.base_url: .*must start with http"):
        load_dispatcher_config(path)
    path.write_text("tiers: {small: {base_url: 'http://x/v1', model: m}}\nfallback_tier: large\n")
    with pytest.raises(ConfigError, match="fallback_tier 'large' is not a configured tier"):
        load_dispatcher_config(path)
    path.write_text("tiers: {small: {base_url: 'http://x/v1', model: m, surprise: 1}}\nfallback_tier: small\n")
    with pytest.raises(ConfigError, match=r"tiers\.small\.surprise: Extra inputs are not permitted"):
        load_dispatcher_config(path)
    path.write_text("tiers: {small: {base_url: 'http://x/v1', model: m, api_key_env: NOPE_NOT_SET}}\n"
                    "fallback_tier: small\n")
    with pytest.raises(ConfigError, match="NOPE_NOT_SET is not set"):
        load_dispatcher_config(path)
    path.write_text("tiers: {small: {base_url: 'http://x/v1', model: m}}\nfallback_tier: small\n"
                    "allowed_hosts: ['dispatcher.internal:8080']\n")
    with pytest.raises(ConfigError, match=r"allowed_hosts: .*host names without scheme or port"):
        load_dispatcher_config(path)
    path.write_text("tiers: {small: {base_url: 'http://x/v1', model: m}}\nfallback_tier: small\n"
                    "inbound: {header_timeout_s: 0}\n")
    with pytest.raises(ConfigError, match=r"inbound\.header_timeout_s: Input should be greater than 0"):
        load_dispatcher_config(path)


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LARGE_API_KEY", "x")
    monkeypatch.setenv("PROMPTIER_API_KEYS", "k")
    monkeypatch.setenv("SEARCH_TEAM_KEYS", "s1,s2")
    monkeypatch.setenv("RESEARCH_TEAM_KEYS", "r1")
    example = Path(__file__).resolve().parent.parent / "serving" / "dispatch" / "dispatcher.example.yaml"
    config = load_dispatcher_config(example)
    assert config.tier_names == ["small", "medium", "large"] and config.fallback_tier == "large"
    assert config.tenant_of_key() == {"k": "default", "s1": "search", "s2": "search", "r1": "research"}


def test_check_validates_a_config_against_its_classifier_without_serving(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, trained_artifact: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from serving.bench.ports import free_port
    from serving.cli import app

    def check(classifier: dict, tier_names: tuple[str, ...] = ("small", "medium", "large")) -> tuple[int, str, Path]:
        path = tmp_path / f"config-{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(json.dumps({
            "classifier": classifier, "fallback_tier": tier_names[-1],
            "tiers": {name: {"base_url": upstream.url, "model": name}
                      for name, upstream in zip(tier_names, fresh.values(), strict=True)},
            "decision_log": {"path": str(tmp_path / "never-written" / "d.jsonl")}}))
        result = CliRunner().invoke(app, ["dispatch", "--config", str(path), "--check"])
        return result.exit_code, result.output, path

    code, output, path = check({"embedded": True, "model": str(trained_artifact)})
    assert code == 0, output
    assert f"config_fingerprint {load_dispatcher_config(path).fingerprint}" in output
    assert "serves tiers ['small', 'medium', 'large']" in output
    code, output, _ = check({"address": grpc_classifier.target})
    assert code == 0 and "the gRPC service at" in output and "serves tiers" in output, output
    # Tier names the classifier does not serve: refused, whichever classifier it is.
    for classifier in ({"embedded": True, "model": str(trained_artifact)}, {"address": grpc_classifier.target}):
        code, output, _ = check(classifier, ("small", "mid", "large"))
        assert code == 2 and "but the dispatcher config maps ['small', 'mid', 'large']" in output, output
    # A service that does not answer cannot be asked: the file is still checked, and the output says so.
    code, output, _ = check({"address": f"127.0.0.1:{free_port()}"})
    assert code == 0 and "did not answer" in output, output
    assert not (tmp_path / "never-written").exists()  # a check serves nothing and writes no log


def test_tiers_that_differ_from_the_classifier_are_refused_at_start(fresh: dict[str, Upstream],
                                                                    grpc_classifier: ServerThread,
                                                                    tmp_path: Path) -> None:
    from serving.dispatch.dispatcher import Dispatcher as DispatcherCore

    renamed = {"small": fresh["small"], "mid": fresh["medium"], "large": fresh["large"]}
    core = DispatcherCore(dispatcher_config(renamed, grpc_classifier.target, tmp_path / "decisions.jsonl"))

    async def start_and_close() -> None:
        try:
            await core.start()
        finally:
            await core.close()

    with pytest.raises(ConfigError, match=r"serves tiers \['small', 'medium', 'large'\].*maps \['small', 'mid', "):
        asyncio.run(start_and_close())


def test_decision_log_rotates_by_size_and_loses_no_line(tmp_path: Path) -> None:
    from serving.dispatch.decision_log import DecisionLog
    from serving.dispatch.dispatch_config import DecisionLogConfig

    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(DecisionLogConfig(path=path, max_bytes=1024, backups=50))
    for index in range(60):
        log.write({"prompt_id": f"p{index}", "padding": "x" * 60})
    log.close()
    files = [path, *sorted(tmp_path.glob("decisions.jsonl.*"))]
    assert len(files) > 3
    assert all(file.stat().st_size <= 1024 for file in files)
    ids = {json.loads(line)["prompt_id"] for file in files for line in file.read_text().splitlines()}
    assert ids == {f"p{index}" for index in range(60)}
    # Reopening an existing log keeps counting from its current size.
    log = DecisionLog(DecisionLogConfig(path=path, max_bytes=1024, backups=50))
    for index in range(20):
        log.write({"prompt_id": f"q{index}", "padding": "x" * 60})
    log.close()
    assert all(file.stat().st_size <= 1024 for file in [path, *tmp_path.glob("decisions.jsonl.*")])


def test_embedded_classifier_routes_like_the_service_and_falls_back_visibly(
        fresh: dict[str, Upstream], trained_artifact: Path, tmp_path: Path) -> None:
    def embedded(timeout_ms: float) -> DispatcherConfig:
        config = dispatcher_config(fresh, "unused:1", tmp_path / "decisions.jsonl")
        return config.model_copy(update={"classifier": ClassifierEndpoint(
            embedded=True, model=trained_artifact, timeout_ms=timeout_ms)})

    running = Dispatcher(embedded(500))
    try:
        client = running.client()
        replies = [client.chat.completions.with_raw_response.create(
            model="promptier", messages=[{"role": "user", "content": text}]) for text in (EASY, HARD)]
        assert [r.headers["x-promptier-tier"] for r in replies] == ["small", "large"]
        assert {r.headers["x-promptier-reason"] for r in replies} == {"classified"}
        health = httpx.get(f"http://127.0.0.1:{running.port}/health").json()
        assert health["classifier"] == "serving" and health["classifier_source"].startswith("embedded model")
        # The embedded model's batcher reports on the dispatcher's own /metrics: two prompts, one model call each.
        metrics = httpx.get(f"http://127.0.0.1:{running.port}/metrics/").text
        assert "promptier_dispatch_classifier_batch_size_count 2.0" in metrics
        assert "promptier_dispatch_classifier_queue_depth" in metrics
    finally:
        running.stop()
    running = Dispatcher(embedded(0.001))  # no model answers in 1 us: every request must fall back, visibly
    try:
        reply = running.client().chat.completions.with_raw_response.create(
            model="promptier", messages=[{"role": "user", "content": EASY}])
        assert reply.headers["x-promptier-reason"] == "fallback" and reply.headers["x-promptier-tier"] == "large"
        metrics = httpx.get(f"http://127.0.0.1:{running.port}/metrics/").text
        assert 'promptier_dispatch_classifier_fallbacks_total{cause="timeout"} 1.0' in metrics
    finally:
        running.stop()


def test_embedded_classifier_config_and_bad_artifact(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only with embedded: true"):
        ClassifierEndpoint(model=tmp_path)
    with pytest.raises(ValueError, match="only to the gRPC service"):
        ClassifierEndpoint(embedded=True, connections=4)
    config = DispatcherConfig.model_validate({
        "classifier": {"embedded": True, "model": str(tmp_path / "missing")},
        "tiers": {"small": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}, "fallback_tier": "small",
        "decision_log": {"path": str(tmp_path / "d.jsonl")}})
    with pytest.raises(PromptierError):  # refused before any port opens
        create_app(config)


def test_decision_log_keeps_a_lone_surrogate_as_an_escape(tmp_path: Path) -> None:
    from serving.dispatch.decision_log import DecisionLog
    from serving.dispatch.dispatch_config import DecisionLogConfig

    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(DecisionLogConfig(path=path))
    log.write({"prompt_id": "a", "prompt": "caf\u00e9 \ud800 end"})  # a JSON body may carry "\ud800"
    log.write({"prompt_id": "b", "prompt": "caf\u00e9"})
    log.close()
    lines = path.read_bytes().decode("utf-8").splitlines()  # the file stays valid UTF-8
    assert [json.loads(line)["prompt"] for line in lines] == ["caf\u00e9 \ud800 end", "caf\u00e9"]
    assert "café" in lines[1]  # non-ASCII text is written as is when it can be


def test_unexpected_error_is_a_json_500_and_the_dispatcher_keeps_serving(
        dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import serving.dispatch.dispatcher

    def broken(raw: bytes) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(serving.dispatch.dispatcher, "parse_chat", broken)
    body = {"model": "promptier", "messages": [{"role": "user", "content": EASY}]}
    with caplog.at_level("ERROR", logger="promptier.dispatcher"):
        reply = httpx.post(f"{dispatcher.base_url}/chat/completions", json=body)
    assert reply.status_code == 500
    assert reply.json()["error"]["type"] == "server_error"
    assert "secret" not in reply.text  # nothing internal leaks to the caller
    assert any("unhandled error" in record.getMessage() for record in caplog.records)  # but it is logged
    monkeypatch.undo()
    answer = dispatcher.client().chat.completions.create(model="promptier", messages=body["messages"])
    assert answer.choices[0].message.content


def test_decision_log_shared_by_processes_loses_and_splits_no_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "decisions.jsonl"
    writer = ("import sys; from pathlib import Path; from serving.dispatch.decision_log import DecisionLog; "
              "from serving.dispatch.dispatch_config import DecisionLogConfig; "
              "log = DecisionLog(DecisionLogConfig(path=Path(sys.argv[1]), max_bytes=2048, backups=1000)); "
              "[log.write({'prompt_id': f'{sys.argv[2]}-{i}', 'padding': 'x' * 60}) for i in range(400)]; "
              "log.close()")
    processes = [subprocess.Popen([sys.executable, "-c", writer, str(path), name]) for name in "abc"]
    assert [process.wait(60) for process in processes] == [0, 0, 0]
    files = [path, *tmp_path.glob("decisions.jsonl.*")]
    ids = [json.loads(line)["prompt_id"] for file in files for line in file.read_text().splitlines()]
    assert sorted(ids) == sorted(f"{name}-{i}" for name in "abc" for i in range(400))  # none lost, none twice
    assert len(files) > 20  # it did rotate, many times, under three writers
    line = len(json.dumps({"prompt_id": "a-100", "padding": "x" * 60})) + 1
    # Each process counts the file's real size, so a file overshoots by at most a line per writer.
    assert max(file.stat().st_size for file in files) <= 2048 + 3 * line
    assert not list(tmp_path.glob("decisions.jsonl*.lock"))  # the lock file stays out of the log's glob


def _post_on_new_connection(port: int, body: dict, owner: Callable[[int], int] = lambda _: -1
                             ) -> tuple[int, str | None, int]:
    """(status, reason header, owner(the client's local port)) for one request on a connection of its
    own; `owner` is asked while the connection is still open."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                           headers={"content-type": "application/json"})
        reply = connection.getresponse()
        reply.read()
        assert connection.sock is not None
        return reply.status, reply.getheader("x-promptier-reason"), owner(connection.sock.getsockname()[1])
    finally:
        connection.close()


def test_dispatcher_workers_spread_connections_add_up_metrics_and_share_the_log(
        fresh: dict[str, Upstream], trained_artifact: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    from collections import Counter

    from serving.bench.ports import free_port

    log_path = tmp_path / "decisions.jsonl"
    config = tmp_path / "dispatcher.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "classifier": {"embedded": True, "model": str(trained_artifact), "timeout_ms": 500},
        "tiers": {name: {"base_url": u.url, "model": f"{name}-upstream-model"} for name, u in fresh.items()},
        "fallback_tier": "large", "decision_log": {"path": str(log_path), "max_bytes": 4096, "backups": 1000}}))
    port = free_port()
    metrics_dir = tmp_path / "metrics"  # given, so the test can look inside (otherwise a temporary one)
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"left by an earlier run")  # must not be counted
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    parent = subprocess.Popen([sys.executable, "-m", "classifier.cli", "dispatch", "--config", str(config),
                               "--port", str(port), "--workers", "2"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body = {"model": "promptier", "messages": [{"role": "user", "content": EASY}]}

    def owner(client_port: int) -> int:
        return worker_serving(parent.pid, port, client_port)

    def requests_total() -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics/", headers={"connection": "close"}).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("promptier_dispatch_requests_total{"))

    try:
        wait_for_health(port, parent)
        served: Counter[int] = Counter()
        sent = 0
        deadline = time.monotonic() + 60
        while len(served) < 2 and time.monotonic() < deadline:
            status, reason, worker = _post_on_new_connection(port, body, owner)
            assert (status, reason) == (200, "classified")
            sent += 1
            served[worker] += 1
        assert len(served) == 2 and -1 not in served, served  # both workers answered requests
        # Whichever worker answers the scrape, /metrics counts every worker's requests.
        assert [requests_total() for _ in range(6)] == [sent] * 6
        lines = [line for file in [log_path, *tmp_path.glob("decisions.jsonl.*")]
                 for line in file.read_text().splitlines()]
        assert len(lines) == sent and {json.loads(line)["reason"] for line in lines} == {"classified"}

        # A worker that hangs and is then killed is replaced well within the supervisor's health-check
        # wait (which the hang makes it start); its counts stay in the sums; the port keeps answering.
        victim = spawned_workers(parent.pid)[0]
        victim.suspend()
        time.sleep(2)  # the supervisor pings every 0.5 s: it is now waiting on the frozen worker
        victim.kill()
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S / 2
        while time.monotonic() < deadline:
            pids = {worker.pid for worker in spawned_workers(parent.pid)}
            if len(pids) == 2 and victim.pid not in pids:
                break
            time.sleep(0.2)
        assert len(pids) == 2 and victim.pid not in pids
        wait_for_health(port, parent)
        assert _post_on_new_connection(port, body)[:2] == (200, "classified")
        assert requests_total() == sent + 1
        # The replacement, once up, drops the dead worker's live gauge (queue depth), not its counters.
        deadline = time.monotonic() + 30
        while list(metrics_dir.glob(f"gauge_live*_{victim.pid}.db")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not list(metrics_dir.glob(f"gauge_live*_{victim.pid}.db"))
        assert list(metrics_dir.glob(f"counter_{victim.pid}.db"))

        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 0
    finally:
        if parent.poll() is None:
            for worker in spawned_workers(parent.pid):
                worker.kill()
            parent.kill()


def test_dispatcher_workers_that_cannot_start_stop_with_a_failure_code(
        fresh: dict[str, Upstream], trained_artifact: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from serving.bench.ports import free_port

    config = tmp_path / "dispatcher.yaml"
    tiers = {"small": "small", "mid": "medium", "large": "large"}  # the model serves small/medium/large
    config.write_text(json.dumps({
        "classifier": {"embedded": True, "model": str(trained_artifact)},
        "tiers": {name: {"base_url": fresh[upstream].url, "model": name} for name, upstream in tiers.items()},
        "fallback_tier": "large", "decision_log": {"path": str(tmp_path / "d.jsonl")}}))
    result = subprocess.run([sys.executable, "-m", "classifier.cli", "dispatch", "--config", str(config),
                             "--port", str(free_port()), "--workers", "2"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3  # uvicorn's start-up failure code, as with one process
    assert "serves tiers ['small', 'medium', 'large'], but the dispatcher config maps ['small', 'mid'" in result.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_rereads_the_config_without_a_failed_request_and_refuses_a_bad_one(
        fresh: dict[str, Upstream], trained_artifact: Path, tmp_path: Path, workers: int) -> None:
    import http.client
    import signal
    import subprocess
    import sys

    from serving.bench.ports import free_port

    config = tmp_path / "dispatcher.yaml"

    def write_config(small_model: str, tier_names: tuple[str, str, str] = ("small", "medium", "large")) -> None:
        upstreams = list(fresh.values())
        config.write_text(json.dumps({
            "classifier": {"embedded": True, "model": str(trained_artifact), "timeout_ms": 500},
            "tiers": {name: {"base_url": upstream.url, "model": small_model if name == "small" else name}
                      for name, upstream in zip(tier_names, upstreams, strict=True)},
            "fallback_tier": tier_names[-1], "decision_log": {"path": str(tmp_path / "d.jsonl")}}))

    def small_upstream_model() -> str:
        """The upstream model a request pinned to the small tier went to (one connection per request, so
        that every worker alive gets requests), or what went wrong."""
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # a bound, not a measurement
        try:
            connection.request("POST", "/v1/chat/completions", body=json.dumps(
                {"model": "promptier/tier/small", "messages": [{"role": "user", "content": EASY}]}),
                headers={"content-type": "application/json"})
            reply = connection.getresponse()
            reply.read()
            if reply.status != 200:
                return f"failed: HTTP {reply.status}"
            return reply.getheader("x-promptier-upstream-model") or "failed: no upstream model header"
        except OSError as error:
            return f"failed: {error!r}"
        finally:
            connection.close()

    write_config("small-v1")
    port = free_port()
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "classifier.cli", "dispatch", "--config", str(config),
                                    "--port", str(port), "--workers", str(workers)],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_health(port, process)
        assert small_upstream_model() == "small-v1"
        first_fingerprint = httpx.get(f"http://127.0.0.1:{port}/health").json()["config_fingerprint"]
        assert first_fingerprint == load_dispatcher_config(config).fingerprint

        first_workers = {worker.pid for worker in spawned_workers(process.pid)}
        assert len(first_workers) == workers
        write_config("small-v2")
        process.send_signal(signal.SIGHUP)
        answers: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            answers.append(small_upstream_model())  # requests keep coming while the workers are replaced
            current = {worker.pid for worker in spawned_workers(process.pid)}
            if len(current) == workers and not current & first_workers:
                break
        assert not current & first_workers and len(current) == workers  # every worker was replaced
        failed = [answer for answer in answers if answer.startswith("failed")]
        assert not failed, failed  # not one request failed or was refused during the reload
        assert [small_upstream_model() for _ in range(2 * workers)] == ["small-v2"] * (2 * workers)
        # /health says which config is live: the fingerprint `promptier dispatch --check` prints for the file.
        live = httpx.get(f"http://127.0.0.1:{port}/health", headers={"connection": "close"}).json()
        assert live["config_fingerprint"] == load_dispatcher_config(config).fingerprint != first_fingerprint

        # A bad edit: the replacement cannot start, the running workers keep serving the last good
        # config, and the dispatcher says so.
        config.write_text("tiers: [not yaml")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 90
        while "aborting the restart" not in stderr_path.read_text() and time.monotonic() < deadline:
            assert small_upstream_model() == "small-v2"
            time.sleep(0.2)
        assert "aborting the restart" in stderr_path.read_text()
        assert '"event": "worker_cannot_start"' in stderr_path.read_text()
        assert process.poll() is None
        assert [small_upstream_model() for _ in range(2 * workers)] == ["small-v2"] * (2 * workers)

        # A worker that dies now cannot be replaced from that file: the dispatcher stops with the
        # start-up failure code instead of restarting the worker forever.
        spawned_workers(process.pid)[0].kill()
        assert process.wait(90) == 3
    finally:
        if process.poll() is None:
            for worker in spawned_workers(process.pid):
                worker.kill()
            process.kill()


def test_usage_is_read_from_the_last_event_of_a_stream() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    last = json.dumps({"choices": [], "usage": usage}).encode()
    middle = json.dumps({"choices": [{"delta": {"content": "x"}}], "usage": None}).encode()
    assert usage_from_stream_tail(b"data: " + middle + b"\n\ndata: " + last + b"\n\ndata: [DONE]\n\n") == usage
    crlf = b"data: " + middle + b"\r\n\r\ndata: " + last + b"\r\n\r\ndata: [DONE]\r\n\r\n"
    assert usage_from_stream_tail(crlf) == usage
    assert usage_from_stream_tail(b"ge\": 1}\n\ndata: " + last + b"\n\n") == usage  # the tail began mid-event
    assert usage_from_stream_tail(b"data: " + middle + b"\n\ndata: [DONE]\n\n") is None  # not asked for
    assert usage_from_stream_tail(b"data: " + last[:20]) is None  # cut short
    assert usage_from_stream_tail(b"event: ping\n\n") is None and usage_from_stream_tail(b"") is None
