"""Capability-aware routing: the dispatcher on a real port, called with the openai SDK, in front of
recording upstreams whose tiers declare what they serve. No request may reach a tier that cannot serve it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from serving.bench.ports import free_port
from serving.dispatch.capabilities import CHARS_PER_TOKEN, IMAGE_TOKENS, Serves, request_needs
from serving.dispatch.decision_log import DECISION_SCHEMA_VERSION
from serving.dispatch.dispatch_config import ConfigError, load_dispatcher_config
from tests.dispatcher_harness import IMAGE, Dispatcher, dispatcher_config, read_log, restricted, user_with_parts
from tests.fake_upstream import Upstream
from tests.grpc_server import EASY, HARD, ServerThread

AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZFZm10IBAAAAABAAEA", "format": "wav"}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
@pytest.fixture
def capable(fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path) -> Iterator[Dispatcher]:
    running = Dispatcher(restricted(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl")))
    yield running
    running.stop()


def _served_by(fresh: dict[str, Upstream]) -> list[str]:
    return [name for name, upstream in fresh.items() if upstream.received]


def test_an_image_never_goes_to_a_tier_without_vision(capable: Dispatcher, fresh: dict[str, Upstream],
                                                      tmp_path: Path) -> None:
    client = capable.client()
    # The classifier sends the text to small, which lacks vision: the next tier up that has it serves.
    easy = client.chat.completions.with_raw_response.create(model="promptier",
                                                           messages=user_with_parts(EASY, IMAGE))
    assert easy.headers["x-promptier-tier"] == "medium" and easy.headers["x-promptier-reason"] == "capability"
    assert easy.headers["x-promptier-steered-from"] == "small" and easy.headers["x-promptier-steered-by"] == "images"
    assert easy.headers["x-promptier-needs"] == "images"
    assert easy.parse().choices[0].message.content == "answer from medium"
    # The classifier sends it to large, which lacks vision too: no dearer tier has it, so the nearest cheaper.
    hard = client.chat.completions.with_raw_response.create(model="promptier/quality",
                                                           messages=user_with_parts(HARD, IMAGE))
    assert hard.headers["x-promptier-tier"] == "medium" and hard.headers["x-promptier-steered-from"] == "large"
    assert _served_by(fresh) == ["medium"]
    assert fresh["medium"].received[0]["body"]["messages"][0]["content"][1] == IMAGE  # passed on untouched
    # The same text without the image goes where the classifier says.
    plain = client.chat.completions.with_raw_response.create(model="promptier", messages=user_with_parts(EASY))
    assert plain.headers["x-promptier-tier"] == "small" and plain.headers["x-promptier-reason"] == "classified"
    assert "x-promptier-steered-from" not in plain.headers and "x-promptier-needs" not in plain.headers
    rows = read_log(tmp_path)
    assert [row["schema_version"] for row in rows] == [DECISION_SCHEMA_VERSION] * 3 and DECISION_SCHEMA_VERSION >= 3
    assert [row["reason"] for row in rows] == ["capability", "capability", "classified"]
    assert rows[0]["needs"] == ["images"] and rows[2]["needs"] == []
    assert rows[0]["steered"] == {"from_tier": "small", "from_reason": "classified", "by": ["images"]}
    assert rows[1]["steered"]["from_tier"] == "large" and rows[2]["steered"] is None
    assert rows[0]["routed_tier"] == rows[0]["tier"] == "medium"
    # Its confidence is the probability of the tier it went to, not of the one the classifier chose.
    assert rows[0]["confidence"] == pytest.approx(rows[0]["scores"]["medium"])
    assert float(easy.headers["x-promptier-confidence"]) == pytest.approx(rows[0]["scores"]["medium"], abs=1e-4)
    metrics = httpx.get(f"http://127.0.0.1:{capable.port}/metrics/").text
    assert 'promptier_dispatch_capability_steered_total{capability="images"} 2.0' in metrics
    assert 'promptier_dispatch_requests_total{reason="capability",status="200",tier="medium"} 2.0' in metrics


def test_tools_and_json_output_only_go_to_tiers_that_serve_them(capable: Dispatcher, fresh: dict[str, Upstream],
                                                                tmp_path: Path) -> None:
    client = capable.client()
    tools = client.chat.completions.with_raw_response.create(model="promptier", messages=user_with_parts(EASY),
                                                            tools=TOOLS, tool_choice="auto")
    assert tools.headers["x-promptier-tier"] == "medium" and tools.headers["x-promptier-steered-by"] == "tools"
    assert fresh["medium"].received[-1]["body"]["tools"] == TOOLS
    # A conversation that already carries a tool result needs a tier that reads tool messages, tools or not.
    turns = [{"role": "user", "content": EASY},
             {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                 "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "user", "content": EASY}]
    followup = client.chat.completions.with_raw_response.create(model="promptier", messages=turns)
    assert followup.headers["x-promptier-tier"] == "medium" and followup.headers["x-promptier-needs"] == "tools"
    structured = client.chat.completions.with_raw_response.create(
        model="promptier", messages=user_with_parts(EASY), response_format={"type": "json_object"})
    assert structured.headers["x-promptier-tier"] == "large"
    assert structured.headers["x-promptier-steered-by"] == "json_output"
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    assert client.chat.completions.with_raw_response.create(
        model="promptier", messages=user_with_parts(EASY),
        response_format=schema).headers["x-promptier-tier"] == "large"
    # response_format text asks for nothing.
    text = client.chat.completions.with_raw_response.create(model="promptier", messages=user_with_parts(EASY),
                                                           response_format={"type": "text"})
    assert text.headers["x-promptier-tier"] == "small"
    assert len(fresh["small"].received) == 1 and "tools" not in fresh["small"].received[0]["body"]
    assert [row["needs"] for row in read_log(tmp_path)] == [["tools"], ["tools"], ["json_output"], ["json_output"], []]


def test_a_prompt_past_a_tiers_context_window_never_goes_to_it(capable: Dispatcher, fresh: dict[str, Upstream],
                                                               tmp_path: Path) -> None:
    client = capable.client()
    # About 2,500 tokens by the estimate (characters / 4): past small's 2,000, within medium's 4,000.
    long = " ".join([EASY] * (10_000 // (len(EASY) + 1)))
    reply = client.chat.completions.with_raw_response.create(model="promptier", messages=[{"role": "user",
                                                                                         "content": long}])
    assert reply.headers["x-promptier-tier"] == "medium"
    if reply.headers["x-promptier-reason"] == "capability":  # the classifier may itself have said medium
        assert reply.headers["x-promptier-steered-by"] == "context_window"
    # The completion the caller asks for counts: a short prompt with max_tokens past small's window.
    capped = client.chat.completions.with_raw_response.create(model="promptier", messages=user_with_parts(EASY),
                                                             max_tokens=1995)
    assert capped.headers["x-promptier-tier"] == "medium"
    assert capped.headers["x-promptier-steered-from"] == "small"
    assert capped.headers["x-promptier-steered-by"] == "context_window"
    # Past every window but large's (no limit declared).
    longer = client.chat.completions.with_raw_response.create(model="promptier", messages=[{
        "role": "user", "content": long * 2}])
    assert longer.headers["x-promptier-tier"] == "large"
    assert not fresh["small"].received
    rows = read_log(tmp_path)
    assert rows[0]["estimated_tokens"] == -(-len(long) // CHARS_PER_TOKEN)
    assert rows[1]["estimated_tokens"] == -(-len(EASY) // CHARS_PER_TOKEN) + 1995
    assert rows[1]["steered"] == {"from_tier": "small", "from_reason": "classified", "by": ["context_window"]}


def test_a_request_without_text_is_routed_by_capability_not_counted_as_a_fallback(
        capable: Dispatcher, fresh: dict[str, Upstream], tmp_path: Path) -> None:
    client = capable.client()
    image_only = client.chat.completions.with_raw_response.create(model="promptier", messages=user_with_parts(IMAGE))
    # The cheapest tier that can serve it; the classifier is not asked.
    assert image_only.headers["x-promptier-tier"] == "medium" and image_only.headers["x-promptier-reason"] == "no_text"
    assert "x-promptier-classifier-ms" not in image_only.headers
    empty = client.chat.completions.with_raw_response.create(model="promptier",
                                                            messages=[{"role": "user", "content": ""}])
    assert empty.headers["x-promptier-tier"] == "small" and empty.headers["x-promptier-reason"] == "no_text"
    system_only = client.chat.completions.with_raw_response.create(
        model="promptier", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  "}])
    assert system_only.headers["x-promptier-tier"] == "small"
    metrics = httpx.get(f"http://127.0.0.1:{capable.port}/metrics/").text
    assert "promptier_dispatch_classifier_fallbacks_total{" not in metrics  # no fallback of any cause
    assert 'promptier_dispatch_requests_total{reason="no_text",status="200",tier="medium"} 1.0' in metrics
    rows = read_log(tmp_path)
    assert [row["reason"] for row in rows] == ["no_text"] * 3
    assert rows[0]["needs"] == ["images"] and rows[0]["estimated_tokens"] == IMAGE_TOKENS
    assert not fresh["large"].received


def test_no_text_tier_from_the_config_and_the_fallback_give_way_to_a_capable_tier(
        fresh: dict[str, Upstream], tmp_path: Path) -> None:
    # No classifier answers here: every request with text falls back, to large, which lacks vision.
    config = restricted(dispatcher_config(fresh, f"127.0.0.1:{free_port()}", tmp_path / "decisions.jsonl",
                                          no_text_tier="large"))
    running = Dispatcher(config)
    try:
        client = running.client()
        fallback = client.chat.completions.with_raw_response.create(model="promptier",
                                                                    messages=user_with_parts(EASY, IMAGE))
        assert fallback.headers["x-promptier-tier"] == "medium"
        assert fallback.headers["x-promptier-reason"] == "capability"
        assert fallback.headers["x-promptier-steered-from"] == "large"
        text_only = client.chat.completions.with_raw_response.create(model="promptier", messages=user_with_parts(EASY))
        assert text_only.headers["x-promptier-tier"] == "large"
        assert text_only.headers["x-promptier-reason"] == "fallback"
        # The configured no-text tier serves what it can, and gives way when it cannot.
        empty = client.chat.completions.with_raw_response.create(model="promptier",
                                                                messages=[{"role": "user", "content": ""}])
        assert empty.headers["x-promptier-tier"] == "large" and empty.headers["x-promptier-reason"] == "no_text"
        image_only = client.chat.completions.with_raw_response.create(model="promptier",
                                                                      messages=user_with_parts(IMAGE))
        assert image_only.headers["x-promptier-tier"] == "medium"
        rows = read_log(tmp_path)
        assert rows[0]["steered"] == {"from_tier": "large", "from_reason": "fallback", "by": ["images"]}
        assert rows[3]["steered"] == {"from_tier": "large", "from_reason": "no_text", "by": ["images"]}
        metrics = httpx.get(f"http://127.0.0.1:{running.port}/metrics/").text
        assert 'promptier_dispatch_classifier_fallbacks_total{cause="UNAVAILABLE"} 2.0' in metrics  # text only
    finally:
        running.stop()


def test_requests_no_tier_can_serve_are_refused_naming_the_capability(capable: Dispatcher,
                                                                     fresh: dict[str, Upstream]) -> None:
    client = capable.client()
    with pytest.raises(openai.BadRequestError) as audio:
        client.chat.completions.create(model="promptier", messages=user_with_parts(EASY, AUDIO))
    assert audio.value.status_code == 400 and audio.value.code == "no_capable_tier"
    assert audio.value.response.headers["x-promptier-needs"] == "audio"  # as on every response to such a request
    assert "audio input (input_audio content parts)" in audio.value.message
    # Each exists somewhere, not together: the message says which tier has which.
    with pytest.raises(openai.BadRequestError) as combined:
        client.chat.completions.create(model="promptier", messages=user_with_parts(EASY, IMAGE),
                                       response_format={"type": "json_object"})
    assert combined.value.code == "no_capable_tier"
    assert combined.value.response.headers["x-promptier-needs"] == "images,json_output"
    assert "no tier has all of them (tiers with each: images: medium; json_output: large)" in combined.value.message
    # Pinned to a tier that cannot: refused, with the tiers that can.
    with pytest.raises(openai.BadRequestError) as pinned:
        client.chat.completions.create(model="promptier/tier/small", messages=user_with_parts(EASY, IMAGE))
    assert pinned.value.code == "tier_cannot_serve"
    assert pinned.value.body["message"].startswith("tier small cannot serve this request: it needs images")
    assert "tiers that can: medium" in pinned.value.message
    with pytest.raises(openai.BadRequestError) as window:
        client.chat.completions.create(model="promptier/tier/medium", messages=user_with_parts(EASY), max_tokens=5000)
    assert window.value.code == "tier_cannot_serve" and "context_window of medium is 4,000" in window.value.message
    # Pinned to a tier that can: served there, as asked.
    pinned_ok = client.chat.completions.with_raw_response.create(model="promptier/tier/medium",
                                                                messages=user_with_parts(EASY, IMAGE))
    assert pinned_ok.headers["x-promptier-tier"] == "medium" and pinned_ok.headers["x-promptier-reason"] == "pinned"
    assert _served_by(fresh) == ["medium"] and len(fresh["medium"].received) == 1
    metrics = httpx.get(f"http://127.0.0.1:{capable.port}/metrics/").text
    assert 'promptier_dispatch_capability_refused_total{capability="audio",pinned="false"} 1.0' in metrics
    assert 'promptier_dispatch_capability_refused_total{capability="images",pinned="true"} 1.0' in metrics
    assert 'promptier_dispatch_capability_refused_total{capability="context_window",pinned="true"} 1.0' in metrics


def test_an_upstream_failure_escalates_only_to_tiers_that_can_serve(capable: Dispatcher,
                                                                   fresh: dict[str, Upstream]) -> None:
    client = capable.client()
    fresh["medium"].behaviour = "500"
    with pytest.raises(openai.APIStatusError) as failed:  # large lacks vision: nowhere else to go
        client.chat.completions.create(model="promptier", messages=user_with_parts(EASY, IMAGE))
    assert failed.value.status_code == 502 and not fresh["large"].received and not fresh["small"].received
    tools = client.chat.completions.with_raw_response.create(model="promptier", messages=user_with_parts(EASY),
                                                            tools=TOOLS)
    assert tools.headers["x-promptier-tier"] == "large" and tools.headers["x-promptier-reason"] == "escalated"
    assert tools.headers["x-promptier-steered-from"] == "small"  # steered first, then escalated


def test_tiers_that_declare_nothing_are_sent_anything(fresh: dict[str, Upstream], grpc_classifier: ServerThread,
                                                      tmp_path: Path) -> None:
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl"))
    try:
        reply = running.client().chat.completions.with_raw_response.create(
            model="promptier", messages=user_with_parts(EASY, IMAGE, AUDIO), tools=TOOLS, max_tokens=10**6)
        assert reply.headers["x-promptier-tier"] == "small" and reply.headers["x-promptier-reason"] == "classified"
        assert reply.headers["x-promptier-needs"] == "images,audio,tools"
    finally:
        running.stop()


def test_request_needs_reads_the_body() -> None:
    def needs(body: dict) -> tuple[tuple[str, ...], int, bool]:
        from serving.dispatch.inbound_request import parse_chat

        parsed, messages = parse_chat(json.dumps(body).encode())
        found = request_needs(parsed, messages)
        return found.features, found.tokens, found.has_text

    text = {"model": "promptier", "messages": [{"role": "user", "content": "x" * 41}]}
    assert needs(text) == ((), 11, True)
    assert needs({**text, "max_tokens": 100, "max_completion_tokens": 7}) == ((), 18, True)  # the newer name wins
    assert needs({**text, "max_tokens": "lots"}) == ((), 11, True)  # the upstream says what is wrong with it
    assert needs({**text, "functions": [{"name": "f"}]})[0] == ("tools",)
    assert needs({**text, "tools": [], "tool_choice": "none"})[0] == ("tools",)
    assert needs({**text, "tools": []})[0] == ()
    assert needs({**text, "response_format": {"type": "json_schema"}})[0] == ("json_output",)
    assert needs({**text, "response_format": "json"})[0] == ()
    assert needs({"messages": [{"role": "user", "content": [IMAGE, IMAGE, AUDIO, "odd part"]}]}) == (
        ("images", "audio"), 2 * IMAGE_TOKENS, False)
    assert needs({"messages": [{"role": "assistant", "content": "hi"}]})[2] is False


def test_capability_config_is_validated_with_errors_that_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "dispatcher.yaml"
    base = "fallback_tier: small\ntiers:\n  small:\n    base_url: http://x/v1\n    model: m\n"
    window = r"tiers\.small\.serves\.context_window: Input should be"
    cases = {
        "    serves: {vision: false}\n": r"tiers\.small\.serves\.vision: Extra inputs are not permitted",
        "    serves: {images: 'no'}\n": r"tiers\.small\.serves\.images: Input should be a valid boolean",
        "    serves: {context_window: 0}\n": f"{window} greater than 0",
        "    serves: {context_window: '32k'}\n": f"{window} a valid integer",
        "    serves: {context_window: 1.5}\n": f"{window} a valid integer",
        "no_text_tier: medium\n": r"no_text_tier 'medium' is not a configured tier",
    }
    for extra, message in cases.items():
        path.write_text(base + extra)
        with pytest.raises(ConfigError, match=message):
            load_dispatcher_config(path)
    path.write_text(base + "    serves: {images: false, context_window: 8192}\n")
    assert load_dispatcher_config(path).tiers["small"].serves == Serves(images=False, context_window=8192)


def test_check_catches_a_capability_mistake_and_lists_what_tiers_lack(fresh: dict[str, Upstream],
                                                                     trained_artifact: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from serving.cli import app

    def check(small: dict) -> tuple[int, str]:
        path = tmp_path / f"config-{len(list(tmp_path.iterdir()))}.yaml"
        tiers = {name: {"base_url": upstream.url, "model": name} for name, upstream in fresh.items()}
        tiers["small"]["serves"] = small
        path.write_text(json.dumps({"classifier": {"embedded": True, "model": str(trained_artifact)},
                                    "fallback_tier": "large", "tiers": tiers,
                                    "decision_log": {"path": str(tmp_path / "d.jsonl")}}))
        result = CliRunner().invoke(app, ["dispatch", "--config", str(path), "--check"])
        return result.exit_code, result.output

    code, output = check({"images": False, "context_window": 32768})
    assert code == 0 and "capabilities: small: no images, context_window 32,768" in output, output
    code, output = check({"image": False})
    assert code == 2 and "tiers.small.serves.image: Extra inputs are not permitted" in output, output
