"""Core routing, driven by the openai SDK against recording upstreams: tiers, pins, headers, classifier fallback."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import ClassVar

import grpc
import httpx
import openai
import pytest

from classifier.policy import choose_tier
from serving._proto.promptier.v1 import router_pb2_grpc
from serving.dispatch.decision_log import DECISION_SCHEMA_VERSION
from serving.dispatch.dispatch_config import ClassifierEndpoint, DispatcherConfig
from serving.dispatch.route_classifier import ClassifierUnavailable, GrpcRouteClassifier
from serving.dispatch.savings import read_window, summarize
from tests.dispatcher_harness import Dispatcher, dispatcher_config, read_log
from tests.fake_upstream import Upstream
from tests.grpc_server import EASY, HARD, ServerThread


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
    entries = read_log(tmp_path)
    assert [e["tier"] for e in entries] == ["small", "large"]
    assert entries[0]["prompt"] == EASY and entries[0]["usage"]["total_tokens"] == 15
    assert entries[0]["cost_usd"] == pytest.approx((10 * 0.2 + 5 * 0.2) / 1e6)
    assert {"prompt_id", "model", "score", "source", "category", "reason", "latency_ms", "status"} <= set(entries[0])
    assert entries[0]["schema_version"] == DECISION_SCHEMA_VERSION and entries[0]["decided_by"] == "model"
    for entry in entries:  # each line carries what reproduces its decision: model, scores, threshold, floor
        scores = [entry["scores"][tier] for tier in ("small", "medium", "large")]
        chosen = choose_tier(scores, entry["threshold"], cheap_floor=entry["cheap_floor"])
        assert ["small", "medium", "large"][chosen] == entry["routed_tier"] and entry["model_version"]
    assert entries[0]["threshold"] != entries[1]["threshold"]  # balanced, then quality


def test_pinning_models_listing_and_health(dispatcher: Dispatcher, fresh: dict[str, Upstream]) -> None:
    client = dispatcher.client()
    pinned = client.chat.completions.with_raw_response.create(
        model="promptier/tier/medium", messages=[{"role": "user", "content": EASY}])
    assert pinned.headers["x-promptier-tier"] == "medium" and pinned.headers["x-promptier-reason"] == "pinned"
    # Nothing was classified: no empty or made-up classification headers.
    assert not {"x-promptier-confidence", "x-promptier-mode", "x-promptier-decided-by"} & set(pinned.headers)
    ids = {model.id for model in client.models.list()}
    assert {"promptier", "promptier/balanced", "promptier/cost", "promptier/tier/small"} <= ids
    assert all(isinstance(model.created, int) for model in client.models.list())
    # One model, as the SDK's models.retrieve asks for it (the ids hold slashes).
    assert client.models.retrieve("promptier/tier/small").id == "promptier/tier/small"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    health = httpx.get(f"http://127.0.0.1:{dispatcher.port}/health").json()
    assert health["classifier"] == "serving"
    deadline = time.monotonic() + 10
    while health["classifier_processes_reached"] is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the dispatcher spreads its 2 connections in the background
        health = httpx.get(f"http://127.0.0.1:{dispatcher.port}/health").json()
    assert health["classifier_processes_reached"] == 1  # the test service is a single process


def test_async_client(dispatcher: Dispatcher) -> None:
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=dispatcher.base_url, api_key="unused", max_retries=0)
        replies = await asyncio.gather(*(client.chat.completions.create(
            model="promptier", messages=[{"role": "user", "content": text}]) for text in (EASY, HARD, EASY)))
        await client.close()
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(run()) == ["answer from small", "answer from large", "answer from small"]


def test_classifier_down_or_slow_falls_back(fresh: dict[str, Upstream], trained_artifact: Path,
                                            tmp_path: Path) -> None:
    classifier_server = ServerThread(model_dir=trained_artifact)
    running = Dispatcher(dispatcher_config(fresh, classifier_server.target, tmp_path / "decisions.jsonl"))
    try:
        client = running.client(timeout=60)  # a dispatcher that hung on the classifier fails by this timeout
        first = client.chat.completions.with_raw_response.create(model="promptier",
                                                                 messages=[{"role": "user", "content": EASY}])
        assert first.headers["x-promptier-reason"] == "classified"
        classifier_server.stop()  # killed mid-run
        second = client.chat.completions.with_raw_response.create(model="promptier",
                                                                  messages=[{"role": "user", "content": EASY}])
        assert second.headers["x-promptier-reason"] == "fallback" and second.headers["x-promptier-tier"] == "large"
        assert second.headers["x-promptier-cause"] == "UNAVAILABLE"  # why, beside the fallback itself
        metrics = httpx.get(f"http://127.0.0.1:{running.port}/metrics/").text
        assert 'promptier_dispatch_classifier_fallbacks_total{cause="UNAVAILABLE"} 1.0' in metrics
        assert "unavailable" in httpx.get(f"http://127.0.0.1:{running.port}/health").json()["classifier"]
    finally:
        running.stop()
    # The line keeps the cause; so does a fallback whose tier then failed, whose reason is the escalation's.
    config = dispatcher_config(fresh, classifier_server.target, tmp_path / "decisions.jsonl")
    config.fallback_tier = "medium"
    fresh["medium"].behaviour = "500"
    running = Dispatcher(config)
    try:
        third = running.client(timeout=60).chat.completions.with_raw_response.create(
            model="promptier", messages=[{"role": "user", "content": EASY}])
        assert (third.headers["x-promptier-reason"], third.headers["x-promptier-tier"]) == ("escalated", "large")
    finally:
        running.stop()
        fresh["medium"].behaviour = "ok"
    entries = read_log(tmp_path)
    assert [(e["reason"], e["cause"]) for e in entries] == [
        ("classified", None), ("fallback", "UNAVAILABLE"), ("escalated", "UNAVAILABLE")]
    assert entries[2]["routed_tier"] == "medium" and entries[2]["failed_tiers"] == ["medium"]
    window = read_window(tmp_path / "decisions.jsonl", 0, 1 << 20)
    assert summarize(window, ["small", "medium", "large"], {})["total"]["fallbacks"] == 2


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
        assert reply.headers["x-promptier-cause"] == "timeout"
        metrics = httpx.get(f"http://127.0.0.1:{running.port}/metrics/").text
        assert 'promptier_dispatch_classifier_fallbacks_total{cause="timeout"} 1.0' in metrics
    finally:
        running.stop()


def test_a_caller_gone_while_its_classification_failed_leaves_no_unread_error(trained_artifact: Path) -> None:
    """Under overload the model's queue refuses a call at once; a caller that went away meanwhile never
    read that error, which asyncio then logged, with a traceback, as never retrieved."""
    import gc

    from prometheus_client import CollectorRegistry

    import classifier
    from serving.common.batcher import BatcherMetrics, QueueFullError
    from serving.dispatch.route_classifier import EmbeddedRouteClassifier

    embedded = EmbeddedRouteClassifier(classifier.load(trained_artifact), 1.0,
                                       BatcherMetrics(CollectorRegistry(), "test"))

    async def refused(*args: object, **kwargs: object) -> None:
        raise QueueFullError("full")

    embedded._batcher.submit = refused  # type: ignore[method-assign,assignment]
    reported: list[dict] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        caller = asyncio.ensure_future(embedded.classify([("user", EASY)], None))
        await asyncio.sleep(0)  # the caller submits; the submission fails in the next turn
        await asyncio.sleep(0)
        caller.cancel()  # ...and the caller goes before it wakes to read it
        with pytest.raises(asyncio.CancelledError):
            await caller
        del caller
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(scenario())
    gc.collect()
    assert not reported, reported


def test_a_grpc_service_falls_back_under_the_causes_an_embedded_classifier_gives() -> None:
    """A slow, overloaded or refusing service is counted under the same cause as an embedded classifier that
    fails the same way, so that one dashboard query covers either; the status itself is kept as detail."""
    class Failing(router_pb2_grpc.RouterServicer):
        """Answers every call as the prompt's text says: too slowly, overloaded or refused."""

        statuses: ClassVar = {"overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED, "bad": grpc.StatusCode.INVALID_ARGUMENT,
                    "broken": grpc.StatusCode.INTERNAL}

        async def Classify(self, request: object, context: grpc.aio.ServicerContext) -> None:
            text = request.conversation.messages[0].content  # type: ignore[attr-defined]
            if text == "slow":
                await asyncio.sleep(5)
            await context.abort(self.statuses.get(text, grpc.StatusCode.UNAVAILABLE), text)

    async def causes() -> dict[str, tuple[str, str | None]]:
        server = grpc.aio.server()
        router_pb2_grpc.add_RouterServicer_to_server(Failing(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        classifier = GrpcRouteClassifier(f"127.0.0.1:{port}", timeout_s=0.3, coalesce=False, connections=1)
        found = {}
        try:
            for text in ("slow", "overloaded", "bad", "broken", "down"):
                with pytest.raises(ClassifierUnavailable) as raised:
                    await classifier.classify([("user", text)], None)
                found[text] = (raised.value.cause, raised.value.detail)
        finally:
            await classifier.close()
            await server.stop(None)
        return found

    assert asyncio.run(causes()) == {"slow": ("timeout", "DEADLINE_EXCEEDED"),
                                     "overloaded": ("overloaded", "RESOURCE_EXHAUSTED"),
                                     "bad": ("invalid_input", "INVALID_ARGUMENT"), "broken": ("error", "INTERNAL"),
                                     "down": ("UNAVAILABLE", None)}


def test_text_the_grpc_client_cannot_send_falls_back_as_invalid_input(
        dispatcher: Dispatcher, grpc_classifier: ServerThread, fresh: dict[str, Upstream]) -> None:
    """JSON's "\\ud800" reads as a lone surrogate, which protobuf cannot encode; an unknown role or too many
    messages are refused before sending. Each is the embedded classifier's `invalid_input` fallback, not a 500."""
    async def causes() -> list[str]:
        classifier = GrpcRouteClassifier(grpc_classifier.target, timeout_s=5, coalesce=False, connections=1)
        found = []
        try:
            for messages in ([("user", "x\ud800y")], [("ipython", "x"), ("user", "hi")], [("user", "hi")] * 10_001):
                with pytest.raises(ClassifierUnavailable) as raised:
                    await classifier.classify(messages, None)
                found.append(raised.value.cause)
        finally:
            await classifier.close()
        return found

    assert asyncio.run(causes()) == ["invalid_input"] * 3
    body = b'{"model": "promptier", "messages": [{"role": "user", "content": "x\\ud800y"}]}'
    response = httpx.post(f"{dispatcher.base_url}/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text
    assert (response.headers["x-promptier-reason"], response.headers["x-promptier-cause"]) == (
        "fallback", "invalid_input")
    assert response.headers["x-promptier-tier"] == "large" and fresh["large"].received  # the fallback tier
