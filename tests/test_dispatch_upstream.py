"""What the dispatcher makes of upstream answers: errors escalated or relayed, timeouts, usage read or noted."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from serving.dispatch.upstream_body import usage_from_stream_tail
from tests.dispatcher_harness import (
    Dispatcher,
    data_events,
    dispatcher_config,
    read_log,
    read_log_once_written,
    streamed_events,
)
from tests.fake_upstream import MISSING, USAGE, Upstream
from tests.grpc_server import EASY, ServerThread


def test_upstream_5xx_and_timeout_escalate_never_downgrade(dispatcher: Dispatcher, fresh: dict[str, Upstream],
                                                           tmp_path: Path) -> None:
    client = dispatcher.client()
    fresh["small"].behaviour = "500"
    raw = client.chat.completions.with_raw_response.create(model="promptier",
                                                           messages=[{"role": "user", "content": EASY}])
    assert raw.headers["x-promptier-tier"] == "medium" and raw.headers["x-promptier-reason"] == "escalated"
    assert raw.headers["x-promptier-failed-tiers"] == "small"
    fresh["medium"].behaviour = "slow"
    raw = client.chat.completions.with_raw_response.create(model="promptier",
                                                           messages=[{"role": "user", "content": EASY}])
    assert raw.headers["x-promptier-tier"] == "large" and raw.headers["x-promptier-failed-tiers"] == "small,medium"
    assert read_log(tmp_path)[-1]["failed_tiers"] == ["small", "medium"]
    fresh["large"].behaviour = "500"
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="promptier/tier/large", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502
    assert len(fresh["small"].received) == 2 and len(fresh["large"].received) == 2  # never retried downwards
    assert read_log(tmp_path)[-1]["status"] == 502
    # Every tier failing: the 502 says the request was escalated, where it ended and what failed on the way,
    # not only the tier routing first chose.
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
    headers = info.value.response.headers
    assert info.value.status_code == 502 and headers["x-promptier-reason"] == "escalated"
    assert headers["x-promptier-tier"] == "large" and headers["x-promptier-failed-tiers"] == "small,medium,large"
    line = read_log(tmp_path)[-1]
    assert (line["tier"], line["routed_tier"], line["reason"], line["status"]) == (None, "small", "escalated", 502)
    assert line["failed_tiers"] == ["small", "medium", "large"]
    metrics = httpx.get(f"http://127.0.0.1:{dispatcher.port}/metrics/").text
    assert 'promptier_dispatch_requests_total{reason="escalated",status="502",tier="large"} 1.0' in metrics


def test_upstream_4xx_goes_back_as_it_came(dispatcher: Dispatcher, fresh: dict[str, Upstream]) -> None:
    fresh["small"].behaviour = "400"
    with pytest.raises(openai.BadRequestError) as info:
        dispatcher.client().chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
    assert "bad temperature" in str(info.value)
    assert not fresh["medium"].received  # a caller's error is not retried elsewhere


def test_an_upstream_refusing_its_key_or_redirecting_fails_its_tier_and_never_reaches_the_caller(
        dispatcher: Dispatcher, fresh: dict[str, Upstream], tmp_path: Path) -> None:
    # A 401 is about the dispatcher's key for the tier, not the caller's: relayed, its body (which
    # often quotes the key) would reach the caller, and the SDK would say the caller's key is invalid.
    # A redirect is not followed: it would post the caller's prompt wherever the upstream points.
    fresh["small"].behaviour = "401"
    raw = dispatcher.client().chat.completions.with_raw_response.create(
        model="promptier", messages=[{"role": "user", "content": EASY}])
    assert raw.headers["x-promptier-tier"] == "medium" and raw.headers["x-promptier-failed-tiers"] == "small"
    assert raw.parse().choices[0].message.content == "answer from medium"
    fresh["small"].received.clear()
    fresh["large"].behaviour = "401"  # the top tier: nowhere left to escalate to
    with pytest.raises(openai.APIStatusError) as info:
        dispatcher.client().chat.completions.create(model="promptier/tier/large",
                                                    messages=[{"role": "user", "content": EASY}])
    assert info.value.status_code == 502 and "Incorrect API key" not in info.value.response.text
    assert "refused the dispatcher's key" in info.value.response.text
    fresh["large"].behaviour, fresh["large"].redirect_to = "redirect", f"{fresh['small'].url}/chat/completions"
    with pytest.raises(openai.APIStatusError) as info:
        dispatcher.client().chat.completions.create(model="promptier/tier/large",
                                                    messages=[{"role": "user", "content": EASY}])
    assert info.value.status_code == 502 and "a redirect, not followed" in info.value.response.text
    assert not fresh["small"].received
    assert read_log(tmp_path)[-1]["failed_tiers"] == ["large"]


def test_an_upstream_429_keeps_the_headers_that_say_when_to_retry(dispatcher: Dispatcher,
                                                                   fresh: dict[str, Upstream]) -> None:
    # OpenAI's SDKs wait what retry-after(-ms) says before they retry a 429; without it they retry at
    # once, into the same rate limit. The upstream's other headers stay its own.
    fresh["small"].behaviour = "429"
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as info:
            dispatcher.client().chat.completions.create(
                model="promptier/tier/small", messages=[{"role": "user", "content": EASY}], stream=stream)
        headers = info.value.response.headers
        assert (headers.get("retry-after"), headers.get("retry-after-ms"), headers.get("x-should-retry")) == (
            "7", "7000", "true")
        assert "x-upstream-secret" not in headers and headers["x-promptier-tier"] == "small"
    assert not fresh["medium"].received


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
        events, text = streamed_events(running.base_url, "promptier/tier/small", EASY, timeout=30)
        assert len(events) == 3 and json.loads(events[-1])["error"]["code"] == "stream_interrupted", text
    finally:
        running.stop()


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
            events = data_events(text)
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
        entry = read_log_once_written(tmp_path, count)[-1]
        assert (entry["status"], entry["tier"], entry["usage"], entry["cost_usd"]) == (200, "small", None, None)
        assert note in entry["note"], entry["note"]
    fresh["small"].usage = USAGE
    httpx.post(url, json=body, timeout=10).raise_for_status()
    entry = read_log_once_written(tmp_path, len(UNREADABLE_USAGE) + 1)[-1]
    assert entry["cost_usd"] > 0 and entry["note"] is None


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


def test_health_says_which_upstreams_fail_and_when_none_can_answer(dispatcher: Dispatcher,
                                                                   fresh: dict[str, Upstream]) -> None:
    """A dispatcher whose every upstream is down still serves (each request a 502), so /health answers
    200; it says `degraded` then, and which tier failed how, not `ok`."""
    def health() -> dict:
        response = httpx.get(f"http://127.0.0.1:{dispatcher.port}/health")
        assert response.status_code == 200
        return response.json()

    assert health()["upstreams"] == {"small": "not used yet", "medium": "not used yet", "large": "not used yet"}
    client = dispatcher.client()
    client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
    assert health()["upstreams"]["small"] == "ok" and health()["status"] == "ok"
    for upstream in fresh.values():
        upstream.behaviour = "500"
    for _ in range(2):
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
    seen = health()
    assert seen["upstreams"] == {"small": "failing", "medium": "failing", "large": "failing"}
    assert seen["status"].startswith("degraded")
    # A dispatcher without keys shows anyone the details an operator would see.
    assert seen["upstream_failures"]["small"]["consecutive_failures"] == 2
    assert seen["upstream_failures"]["large"]["last_error"] == "tier large: upstream returned 500"
    fresh["medium"].behaviour = "ok"
    client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
    seen = health()
    assert seen["status"] == "ok" and seen["upstreams"]["medium"] == "ok" and "medium" not in seen["upstream_failures"]
