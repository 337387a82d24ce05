"""Promptier as a LiteLLM callback: a real LiteLLM proxy, started from its own package on a free port, in front of
three recording OpenAI-compatible upstreams, called with the openai SDK."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

# Importing LiteLLM otherwise fetches its model cost map from the network (and retries for seconds offline).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
pytest.importorskip("litellm", reason="LiteLLM is not installed: pip install -e '.[litellm]'")

import classifier  # after the skip: this module needs LiteLLM
from classifier.conversation import render_conversation
from classifier.errors import ArtifactError
from serving.bench.litellm_bench import LiteLLMProxy
from serving.bench.ports import free_port
from serving.dispatch.dispatch_config import ConfigError
from serving.litellm_router import (
    CONFIG_ENV,
    LiteLLMRouterConfig,
    PromptierRouter,
    load_router_config,
)
from tests.fake_upstream import Upstream
from tests.grpc_server import ServerThread

EASY = ("hi", "What is the capital of France?")
HARD = ("Prove that there are infinitely many primes, then design a fault-tolerant distributed consensus protocol "
        "for a multi-region database and prove its safety under network partitions.")
GROUPS = {"small": "cheap-group", "medium": "mid-group", "large": "top-group"}
MASTER_KEY = "sk-promptier-test"
# As serving/README.md lists them: each group escalates to every dearer one (LiteLLM does not chain fallbacks).
FALLBACKS = [{GROUPS["small"]: [GROUPS["medium"], GROUPS["large"]]}, {GROUPS["medium"]: [GROUPS["large"]]}]
# A deployment serving any `wild/<model>`: a group that is in no list of model names, yet LiteLLM routes it.
WILDCARD_GROUP = "wild/large-upstream-model"
# LiteLLM's proxy takes 10-30 s to start on a quiet machine; on a busy 2-core one, longer.
READY_WAIT_S = 300
# Where the fixture's logging callback writes what LiteLLM's standard logging payload held, beside its config.
LOGGED = "logged.jsonl"
# A logging callback of the kind LiteLLM's own loggers are (spend logs, Langfuse, OpenTelemetry): it sees the
# StandardLoggingPayload, not the request's metadata.
SPY_MODULE = """
import json
from litellm.integrations.custom_logger import CustomLogger

class Spy(CustomLogger):
    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        payload = kwargs["standard_logging_object"]
        with open(%r, "a", encoding="utf-8") as out:
            out.write(json.dumps({"model_group": payload["model_group"],
                                  "spend_logs_metadata": payload["metadata"]["spend_logs_metadata"]}) + "\\n")

spy = Spy()
"""


def _litellm_config(upstreams: dict[str, Upstream], callbacks: list[str]) -> dict:
    return {
        "model_list": [{"model_name": GROUPS[tier], "litellm_params": {
            "model": f"openai/{tier}-upstream-model", "api_base": upstream.url, "api_key": "sk-upstream"}}
            for tier, upstream in upstreams.items()] + [{"model_name": "wild/*", "litellm_params": {
                "model": "openai/*", "api_base": upstreams["large"].url, "api_key": "sk-upstream"}}],
        # The alias lists `promptier` in /v1/models, and is where it would go if the hook were not loaded.
        # Without cooldowns, an upstream a test makes fail is not left out of the next tests' requests.
        "router_settings": {"model_group_alias": {"promptier": GROUPS["medium"]}, "num_retries": 0,
                            "fallbacks": FALLBACKS, "disable_cooldowns": True},
        "litellm_settings": {"callbacks": callbacks},
        "general_settings": {"master_key": MASTER_KEY},
    }


class Proxy(LiteLLMProxy):
    """The proxy as the tests drive it: waits until it serves, and hands out openai clients."""

    def wait_ready(self, timeout_s: float = READY_WAIT_S) -> None:
        try:
            super().wait_ready(timeout_s)
        except RuntimeError as error:
            pytest.fail(str(error))

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=120)


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Upstream]]:
    servers = {tier: Upstream(tier) for tier in GROUPS}
    yield servers
    for upstream in servers.values():
        upstream.server.should_exit = True


@pytest.fixture(scope="module")
def proxy(upstreams: dict[str, Upstream], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """The proxy with the shipped model embedded, as the README configures and runs it, plus two more routers
    (built from a module beside the config, as a user's own would be): one whose top tier maps to a group the
    proxy lacks, one whose top tier maps to a name only a wildcard deployment serves."""
    directory = tmp_path_factory.mktemp("litellm")
    _checkout_like(directory)  # as the README runs it: the config at the checkout's root, beside `serving/`
    promptier_config = _write(directory / "promptier.yaml", {
        "tiers": GROUPS, "fallback_tier": "medium", "classifier": {"embedded": True, "timeout_ms": 2000}})
    unserved = _write(directory / "unserved.yaml", {
        "router_model": "promptier-unserved", "tiers": {**GROUPS, "large": "no-such-group"},
        "fallback_tier": "medium", "classifier": {"embedded": True}})
    wildcard = _write(directory / "wildcard.yaml", {
        "router_model": "promptier-wildcard", "tiers": {**GROUPS, "large": WILDCARD_GROUP},
        "fallback_tier": "medium", "classifier": {"embedded": True, "timeout_ms": 2000}})
    (directory / "own_hooks.py").write_text(
        "from serving.litellm_router import PromptierRouter\n"
        f"unserved = PromptierRouter.from_file({str(unserved)!r})\n"
        f"wildcard = PromptierRouter.from_file({str(wildcard)!r})\n", encoding="utf-8")
    (directory / "spy.py").write_text(SPY_MODULE % str(directory / LOGGED), encoding="utf-8")
    callbacks = ["serving.litellm_router.hook", "own_hooks.unserved", "own_hooks.wildcard", "spy.spy"]
    running = Proxy(directory, _litellm_config(upstreams, callbacks), promptier_config)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def runtime() -> classifier.TierClassifier:
    return classifier.load()


def _expected_tier(runtime: classifier.TierClassifier, prompt: str, mode: str | None = None) -> str:
    request = classifier.RoutingRequest(mode=mode) if mode else None
    return runtime.classify(render_conversation([("user", prompt)]), request).tier


def _received(upstreams: dict[str, Upstream]) -> dict[str, int]:
    return {tier: len(upstream.received) for tier, upstream in upstreams.items()}


def _clear(upstreams: dict[str, Upstream]) -> None:
    for upstream in upstreams.values():
        upstream.received.clear()


def _ask(proxy: Proxy, prompt: str, model: str = "promptier", **extra: object) -> tuple[dict[str, str], str]:
    raw = proxy.client().chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], **extra)  # type: ignore[call-overload]
    return dict(raw.headers), raw.parse().choices[0].message.content


def test_easy_and_hard_prompts_reach_the_groups_their_tiers_map_to(proxy: Proxy, upstreams: dict[str, Upstream],
                                                                   runtime: classifier.TierClassifier) -> None:
    tiers = runtime.tier_names
    hard_tier = _expected_tier(runtime, HARD)
    for easy in EASY:
        # What the shipped model decides, not a hard-coded answer; but the test means something only if it
        # tells the two apart, cheaper first.
        assert tiers.index(_expected_tier(runtime, easy)) < tiers.index(hard_tier), easy
    for prompt in (*EASY, HARD):
        _clear(upstreams)
        expected = _expected_tier(runtime, prompt)
        headers, answer = _ask(proxy, prompt)
        assert answer == f"answer from {expected}", prompt
        assert _received(upstreams) == {tier: int(tier == expected) for tier in GROUPS}
        assert upstreams[expected].received[0]["body"]["model"] == f"{expected}-upstream-model"
        assert upstreams[expected].received[0]["body"]["messages"] == [{"role": "user", "content": prompt}]
        assert headers["x-promptier-tier"] == expected
        assert headers["x-promptier-model-group"] == GROUPS[expected]
        assert headers["x-promptier-reason"] == "classified"
        assert headers["x-promptier-mode"] == "balanced"
        assert headers["x-promptier-decided-by"] in ("model", "prior")
        assert headers["x-promptier-model-version"] == runtime.model_version
        assert 0.0 <= float(headers["x-promptier-confidence"]) <= 1.0


def test_streaming_requests_are_routed_too(proxy: Proxy, upstreams: dict[str, Upstream],
                                           runtime: classifier.TierClassifier) -> None:
    _clear(upstreams)
    expected = _expected_tier(runtime, HARD)
    with proxy.client().chat.completions.with_streaming_response.create(
            model="promptier", messages=[{"role": "user", "content": HARD}], stream=True) as response:
        assert response.headers["x-promptier-tier"] == expected
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
    assert text == "".join(f"{expected}-{index} " for index in range(5))
    assert _received(upstreams) == {tier: int(tier == expected) for tier in GROUPS}


def test_a_model_other_than_the_router_model_is_served_as_asked(proxy: Proxy, upstreams: dict[str, Upstream]
                                                                 ) -> None:
    _clear(upstreams)
    # An easy prompt pinned to the top group stays there; a "decision" the caller wrote into its metadata
    # does not come back as headers.
    headers, answer = _ask(proxy, EASY[0], model=GROUPS["large"],
                           extra_body={"metadata": {"promptier": {"tier": "small", "reason": "classified"}}})
    assert answer == "answer from large"
    assert _received(upstreams) == {"small": 0, "medium": 0, "large": 1}
    assert not [name for name in headers if name.startswith("x-promptier-")]


def test_the_mode_comes_from_request_metadata_and_a_bad_one_is_a_400(proxy: Proxy, upstreams: dict[str, Upstream],
                                                                      runtime: classifier.TierClassifier) -> None:
    for mode in ("cost", "quality"):
        _clear(upstreams)
        expected = _expected_tier(runtime, HARD, mode)
        headers, answer = _ask(proxy, HARD, extra_body={"metadata": {"promptier_mode": mode}})
        assert (headers["x-promptier-mode"], headers["x-promptier-tier"], answer) == (
            mode, expected, f"answer from {expected}")
    _clear(upstreams)
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(proxy, HARD, extra_body={"metadata": {"promptier_mode": "cheapest"}})
    assert "promptier_mode" in str(refused.value) and "cheapest" in str(refused.value)
    assert _received(upstreams) == {"small": 0, "medium": 0, "large": 0}
    assert _ask(proxy, EASY[0])[0]["x-promptier-reason"] == "classified"  # and it keeps serving


def test_a_null_mode_is_the_default_mode(proxy: Proxy, runtime: classifier.TierClassifier) -> None:
    # SDKs send an optional field left empty as null: that is no mode, not an unknown one.
    headers, answer = _ask(proxy, HARD, extra_body={"metadata": {"promptier_mode": None}})
    expected = _expected_tier(runtime, HARD)
    assert (headers["x-promptier-mode"], headers["x-promptier-tier"], answer) == (
        "balanced", expected, f"answer from {expected}")


def _logged(proxy: Proxy, case: str) -> dict:
    """What the logging callback saw for the request whose spend_logs_metadata `case` is `case`: LiteLLM logs
    after it answers, so this waits for it (a minute at most, then fails)."""
    path = proxy.output.parent / LOGGED
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                if (entry["spend_logs_metadata"] or {}).get("case") == case:
                    return entry
        time.sleep(0.2)
    pytest.fail(f"LiteLLM logged no request with case {case!r}")


def test_the_decision_is_in_what_litellm_spend_logs_and_standard_loggers_see(
        proxy: Proxy, runtime: classifier.TierClassifier) -> None:
    expected = _expected_tier(runtime, HARD)
    headers, _ = _ask(proxy, HARD, extra_body={"metadata": {"spend_logs_metadata": {
        "case": "routed", "team": "a", "promptier": "forged"}}})
    routed = _logged(proxy, "routed")
    assert routed["model_group"] == GROUPS[expected]
    assert routed["spend_logs_metadata"]["team"] == "a"  # the caller's own entries stay
    record = routed["spend_logs_metadata"].get("promptier")
    assert isinstance(record, dict), routed  # the hook's decision, not the caller's forgery
    assert (record["tier"], record["model_group"], record["reason"], record["mode"]) == (
        expected, GROUPS[expected], "classified", "balanced")
    assert record["model_version"] == headers["x-promptier-model-version"]
    # A pinned request's log holds no decision, not even one the caller wrote.
    _ask(proxy, HARD, model=GROUPS["small"], extra_body={"metadata": {"spend_logs_metadata": {
        "case": "pinned", "promptier": {"tier": "large", "reason": "classified"}}}})
    assert _logged(proxy, "pinned")["spend_logs_metadata"] == {"case": "pinned"}


# LiteLLM's endpoints that keep its metadata in `litellm_metadata`, not in `metadata` (there the caller's own, for
# the provider): a request for each, as a caller sends it.
LITELLM_METADATA_ENDPOINTS = {
    "/v1/responses": {"input": HARD, "metadata": {"app": "x"}},
    "/v1/messages": {"max_tokens": 16, "messages": [{"role": "user", "content": HARD}],
                     "metadata": {"user_id": "u1"}},
}


def _post(proxy: Proxy, path: str, body: dict) -> httpx.Response:
    response = httpx.post(f"{proxy.url}{path}", json=body, headers={"authorization": f"Bearer {MASTER_KEY}"},
                          timeout=120)
    assert response.status_code == 200, response.text
    return response


@pytest.mark.parametrize("path", LITELLM_METADATA_ENDPOINTS)
def test_on_endpoints_with_litellm_metadata_the_decision_is_logged_and_a_forged_one_is_not(
        proxy: Proxy, upstreams: dict[str, Upstream], path: str) -> None:
    """There LiteLLM's spend logs read `litellm_metadata`: the decision written into `metadata` never reached
    them, and a `promptier` entry the caller wrote into `litellm_metadata` was logged as the decision."""
    forged = {"tier": "large", "model_group": GROUPS["large"], "reason": "classified"}
    _clear(upstreams)
    response = _post(proxy, path, {"model": "promptier", **LITELLM_METADATA_ENDPOINTS[path], "litellm_metadata": {
        "promptier": forged, "spend_logs_metadata": {"case": f"{path} routed", "team": "a", "promptier": forged}}})
    # Only chat requests are classified: these go to the fallback tier's group, and say so.
    assert _received(upstreams) == {"small": 0, "medium": 1, "large": 0}
    assert response.headers["x-promptier-reason"] == "fallback"
    assert response.headers["x-promptier-cause"] == "unsupported_call_type"
    logged = _logged(proxy, f"{path} routed")
    assert logged["model_group"] == GROUPS["medium"]
    assert logged["spend_logs_metadata"]["team"] == "a"
    record = logged["spend_logs_metadata"].get("promptier")
    assert isinstance(record, dict) and record.get("reason") == "fallback", logged
    assert (record["tier"], record["model_group"], record["cause"]) == (
        "medium", GROUPS["medium"], "unsupported_call_type")
    # The caller's `metadata`, which goes to the provider, carries no record of the hook's.
    sent = upstreams["medium"].received[0]["body"]
    assert "promptier" not in json.dumps(sent.get("metadata")), sent
    # Pinned: no decision logged, not even the caller's, and no headers.
    response = _post(proxy, path, {"model": GROUPS["small"], **LITELLM_METADATA_ENDPOINTS[path], "litellm_metadata": {
        "promptier": forged, "spend_logs_metadata": {"case": f"{path} pinned", "promptier": forged}}})
    assert not [name for name in response.headers if name.startswith("x-promptier-")]
    assert _logged(proxy, f"{path} pinned")["spend_logs_metadata"] == {"case": f"{path} pinned"}


def test_the_hook_writes_where_litellm_keeps_its_metadata_and_drops_forged_records_from_both_buckets() -> None:
    router = PromptierRouter(LiteLLMRouterConfig.model_validate(
        {"tiers": GROUPS, "fallback_tier": "medium", "classifier": {"embedded": True, "timeout_ms": 2000}}))
    router._groups_served = True  # no proxy here: its model groups are taken as served
    forged = {"tier": "large", "reason": "classified"}

    def request(model: str) -> dict:
        return {"model": model, "input": HARD,
                "metadata": {"app": "x", "promptier": forged, "spend_logs_metadata": {"promptier": forged}},
                "litellm_metadata": {"promptier": forged, "spend_logs_metadata": {"case": 1, "promptier": forged}}}

    async def hook(data: dict) -> dict:
        return await router.async_pre_call_hook(None, None, data, "aresponses") or data

    async def run() -> tuple[dict, dict, dict | None, dict | None]:
        try:
            routed, pinned = await hook(request("promptier")), await hook(request(GROUPS["small"]))
            return (routed, pinned, await router.async_post_call_response_headers_hook(routed, None, None),
                    await router.async_post_call_response_headers_hook(pinned, None, None))
        finally:
            await router.close()

    routed, pinned, routed_headers, pinned_headers = asyncio.run(run())
    record = routed["litellm_metadata"]["promptier"]
    assert (routed["model"], record["model_group"], record["cause"]) == (
        GROUPS["medium"], GROUPS["medium"], "unsupported_call_type")
    assert routed["litellm_metadata"]["spend_logs_metadata"] == {"case": 1, "promptier": dict(record)}
    assert routed["metadata"] == {"app": "x", "spend_logs_metadata": {}}  # the provider's: no record
    assert routed_headers is not None and routed_headers["x-promptier-cause"] == "unsupported_call_type"
    assert pinned["model"] == GROUPS["small"] and pinned_headers is None
    assert pinned["metadata"] == {"app": "x", "spend_logs_metadata": {}}
    assert pinned["litellm_metadata"] == {"spend_logs_metadata": {"case": 1}}


def test_a_request_the_classifier_cannot_read_goes_to_the_fallback_group_visibly(
        proxy: Proxy, upstreams: dict[str, Upstream]) -> None:
    _clear(upstreams)
    raw = proxy.client().chat.completions.with_raw_response.create(
        model="promptier", messages=[{"role": "system", "content": "You are terse."}])
    assert raw.parse().choices[0].message.content == "answer from medium"
    assert _received(upstreams) == {"small": 0, "medium": 1, "large": 0}
    assert (raw.headers["x-promptier-reason"], raw.headers["x-promptier-cause"],
            raw.headers["x-promptier-tier"]) == ("fallback", "invalid_input", "medium")
    assert "x-promptier-confidence" not in raw.headers
    assert '"event": "classifier_fallback", "router": "promptier", "cause": "invalid_input"' in proxy.tail(200_000)


def test_a_tier_mapped_to_a_group_the_proxy_lacks_is_a_500_that_names_it(proxy: Proxy,
                                                                          upstreams: dict[str, Upstream]) -> None:
    _clear(upstreams)
    with pytest.raises(openai.InternalServerError) as failed:
        _ask(proxy, EASY[0], model="promptier-unserved")
    assert "no-such-group" in str(failed.value)
    # A proxy with several routers: the message names the one at fault, and the file to mend.
    assert "router 'promptier-unserved' (" in str(failed.value) and "unserved.yaml)" in str(failed.value)
    assert _received(upstreams) == {"small": 0, "medium": 0, "large": 0}
    assert _ask(proxy, EASY[1])[0]["x-promptier-reason"] == "classified"  # the other router is unaffected


def test_a_tier_mapped_to_a_name_a_wildcard_deployment_serves_is_routed(
        proxy: Proxy, upstreams: dict[str, Upstream], runtime: classifier.TierClassifier) -> None:
    groups = {**GROUPS, "large": WILDCARD_GROUP}
    for prompt in (EASY[0], HARD):
        _clear(upstreams)
        expected = _expected_tier(runtime, prompt)
        headers, answer = _ask(proxy, prompt, model="promptier-wildcard")
        assert answer == f"answer from {expected}", prompt
        assert (headers["x-promptier-reason"], headers["x-promptier-model-group"]) == ("classified", groups[expected])
        assert upstreams[expected].received[0]["body"]["model"] == f"{expected}-upstream-model"


def test_an_upstream_that_fails_escalates_through_the_listed_fallbacks_and_the_headers_keep_the_decision(
        proxy: Proxy, upstreams: dict[str, Upstream], runtime: classifier.TierClassifier) -> None:
    cheapest = runtime.tier_names[0]
    assert _expected_tier(runtime, EASY[0]) == cheapest  # or this would test nothing
    _clear(upstreams)
    for tier in ("small", "medium"):
        upstreams[tier].behaviour = "500"
    try:
        headers, answer = _ask(proxy, EASY[0])
    finally:
        for upstream in upstreams.values():
            upstream.behaviour = "ok"
    assert answer == "answer from large"
    assert _received(upstreams) == {"small": 1, "medium": 1, "large": 1}
    assert (headers["x-promptier-tier"], headers["x-promptier-model-group"], headers["x-promptier-reason"]) == (
        cheapest, GROUPS[cheapest], "classified")
    assert headers["x-litellm-model-group"] == GROUPS["large"]


def test_classifier_service_down_falls_back_with_its_cause(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    """The gRPC form, with nothing listening: the start only warns (the service may come later); each request
    goes to the fallback group and says why."""
    config = LiteLLMRouterConfig.model_validate({
        "router_model": "promptier-grpc", "tiers": GROUPS, "fallback_tier": "large",
        "classifier": {"address": f"127.0.0.1:{free_port()}", "timeout_ms": 200}})
    router = PromptierRouter(config)
    # Each line names its router: a proxy with several has several classifiers to look at.
    assert '"event": "classifier_not_checked", "router": "promptier-grpc"' in caplog.text
    assert '"detail": "UNAVAILABLE"' in caplog.text
    assert '"level": "warning"' in caplog.text and "requests go to the fallback tier's group" in caplog.text

    async def route() -> dict:
        data = {"model": "promptier-grpc", "messages": [{"role": "user", "content": HARD}]}
        try:
            await router.decide(data, "acompletion")  # the proxy's hook, less its check of the model groups
            return await router.decide(data, "acompletion")
        finally:
            await router.close()

    decision = asyncio.run(route())
    assert decision["reason"] == "fallback" and decision["model_group"] == "top-group"
    assert '"event": "classifier_fallback", "router": "promptier-grpc", "cause": ' in caplog.text
    assert decision["cause"] in ("UNAVAILABLE", "timeout")


def test_a_decision_made_in_time_is_used_though_the_busy_event_loop_sees_it_late() -> None:
    """LiteLLM's event loop, busy with other requests, can take up the deadline after the model has answered:
    falling back then saves no time, and sends the request to the wrong tier."""
    router = PromptierRouter(LiteLLMRouterConfig.model_validate(
        {"tiers": GROUPS, "fallback_tier": "medium", "classifier": {"embedded": True, "timeout_ms": 1000}}))
    data = {"model": "promptier", "messages": [{"role": "user", "content": HARD}]}

    async def route() -> list[dict]:
        try:
            warm = await router.decide(dict(data), "acompletion")  # the first call starts the model's thread
            routing = asyncio.ensure_future(router.decide(dict(data), "acompletion"))
            for _ in range(5):  # until the prompt is queued for the model, which answers in milliseconds
                await asyncio.sleep(0)
            time.sleep(1.5)  # another request's work holds the loop past the deadline
            return [warm, await routing]
        finally:
            await router.close()

    warm, late = asyncio.run(route())
    assert warm["reason"] == "classified"
    assert (late["reason"], late["tier"]) == ("classified", warm["tier"]), late
    assert late["classifier_ms"] >= 1500  # the header still tells how long the request waited for it


def test_through_the_grpc_service_tiers_are_checked_at_start_and_requests_classified(
        runtime: classifier.TierClassifier) -> None:
    service = ServerThread()  # `promptier serve` in-process, with the shipped model
    try:
        address = {"address": service.target, "timeout_ms": 2000}
        with pytest.raises(ConfigError, match="map every tier of the model"):
            PromptierRouter(LiteLLMRouterConfig.model_validate(
                {"tiers": {"small": "a", "large": "b"}, "fallback_tier": "small", "classifier": address}))
        router = PromptierRouter(LiteLLMRouterConfig.model_validate(
            {"tiers": GROUPS, "fallback_tier": "medium", "classifier": address}))

        async def route() -> list[dict]:
            try:
                return [await router.decide({"model": "promptier", "messages": [{"role": "user", "content": prompt}],
                                             "metadata": {"promptier_mode": "cost"}}, "acompletion")
                        for prompt in (EASY[1], HARD)]
            finally:
                await router.close()

        for prompt, decision in zip((EASY[1], HARD), asyncio.run(route()), strict=True):
            expected = _expected_tier(runtime, prompt, "cost")
            assert (decision["reason"], decision["tier"], decision["model_group"], decision["mode"]) == (
                "classified", expected, GROUPS[expected], "cost")
    finally:
        service.stop()


def test_bad_configs_are_refused_with_the_field_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refusal(config: dict) -> str:
        with pytest.raises(ConfigError) as refused:
            load_router_config(_write(tmp_path / "bad.yaml", config))
        return str(refused.value)

    assert "fallback_tier 'huge'" in refusal({"tiers": GROUPS, "fallback_tier": "huge"})
    assert "default_mode" in refusal({"tiers": GROUPS, "fallback_tier": "small", "default_mode": "cheap"})
    assert "router_model 'cheap-group'" in refusal({"tiers": GROUPS, "fallback_tier": "small",
                                                    "router_model": "cheap-group"})
    assert "tiers" in refusal({"fallback_tier": "small"})
    # LiteLLM matches model names exactly: a blank or padded name is a slip that would never match.
    assert "router_model: Value error, ' ' is blank" in refusal({"tiers": GROUPS, "fallback_tier": "small",
                                                                 "router_model": " "})
    assert "router_model: Value error, ' promptier' has white space at its start or end" in refusal(
        {"tiers": GROUPS, "fallback_tier": "small", "router_model": " promptier"})
    padded = refusal({"tiers": {**GROUPS, "large": " top-group ", "small": "  "}, "fallback_tier": "small"})
    assert "tiers: Value error, " in padded and "small: '  ' is blank" in padded
    assert "large: ' top-group ' has white space at its start or end" in padded and "not 'top-group'" in padded
    assert "extra" in refusal({"tiers": GROUPS, "fallback_tier": "small", "fallback_group": "x"}).lower()
    # The model's tiers are small, medium, large: a map that leaves one out, or names another, cannot load.
    for tiers in ({"small": "a", "large": "b"}, {**GROUPS, "tiny": "t"}):
        with pytest.raises(ConfigError, match="map every tier of the model"):
            PromptierRouter(LiteLLMRouterConfig.model_validate(
                {"tiers": tiers, "fallback_tier": "small", "classifier": {"embedded": True}}))
    # From a file, the error names it: a proxy with several routers has several.
    unfit = _write(tmp_path / "unfit.yaml", {"tiers": {"small": "a", "large": "b"}, "fallback_tier": "small",
                                             "classifier": {"embedded": True}})
    with pytest.raises(ConfigError, match=f"^{unfit}: tiers: .*map every tier of the model"):
        PromptierRouter.from_file(unfit)
    with pytest.raises(ArtifactError, match=f"^{unfit}: classifier.model: "):
        PromptierRouter.from_file(_write(unfit, {"tiers": GROUPS, "fallback_tier": "small", "classifier": {
            "embedded": True, "model": str(tmp_path / "no-model")}}))
    import serving.litellm_router as module

    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setattr(module, "_hook", None)
    with pytest.raises(ConfigError, match=CONFIG_ENV):
        module.hook  # noqa: B018  (resolving the attribute is what LiteLLM does)


def test_a_proxy_whose_tier_map_does_not_fit_the_model_does_not_start(upstreams: dict[str, Upstream],
                                                                      tmp_path: Path) -> None:
    promptier_config = _write(tmp_path / "promptier.yaml", {
        "tiers": {"small": GROUPS["small"], "large": GROUPS["large"]}, "fallback_tier": "small",
        "classifier": {"embedded": True}})
    failing = Proxy(tmp_path, _litellm_config(upstreams, ["serving.litellm_router.hook"]), promptier_config)
    try:
        failing.process.wait(timeout=READY_WAIT_S)
    finally:
        failing.stop()
    assert failing.process.returncode != 0
    assert f"{promptier_config}: tiers: " in failing.tail(100_000)
    assert "map every tier of the model" in failing.tail(100_000)


def test_the_example_config_fits_the_shipped_model() -> None:
    example = Path(__file__).resolve().parent.parent / "serving" / "promptier-litellm.example.yaml"
    router = PromptierRouter.from_file(example)  # loads the shipped model and checks the tier map against it
    assert list(router.config.tiers) == classifier.load().tier_names
    assert router.config.classifier.embedded and router.config.router_model == "promptier"


def test_a_config_without_a_deadline_gets_the_proxys_not_the_dispatchers() -> None:
    """LiteLLM's busy event loop takes up answers later than the dispatcher's: a config that leaves the
    deadline out got the dispatcher's 20 ms, and sent answers the model had made to the fallback group."""
    from serving.litellm_router import TIMEOUT_MS

    base = {"tiers": GROUPS, "fallback_tier": "medium"}
    for classifier_block in ({}, {"classifier": {"embedded": True}}, {"classifier": {"address": "127.0.0.1:1"}}):
        config = LiteLLMRouterConfig.model_validate({**base, **classifier_block})
        assert config.classifier.timeout_ms == TIMEOUT_MS == 50.0, classifier_block
    given = LiteLLMRouterConfig.model_validate({**base, "classifier": {"embedded": True, "timeout_ms": 20}})
    assert given.classifier.timeout_ms == 20


def test_litellm_bench_names_a_failed_answer_instead_of_a_traceback() -> None:
    """The bench's requests through the proxy: an error answer (an upstream down, a bad key) ends the
    bench with the proxy's own message, not httpx's traceback."""
    import httpx

    from serving.bench.litellm_bench import _timed

    def fail(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": {"message": "upstream connection refused"}})

    with httpx.Client(transport=httpx.MockTransport(fail)) as client, \
            pytest.raises(RuntimeError, match=r"answered 500: .*upstream connection refused"):
        _timed(client, "http://proxy/v1/chat/completions", {"model": "promptier"})


# LiteLLM resolving `callbacks: ["serving.litellm_router.hook"]` for a config at the Promptier checkout's root: it
# finds `serving/litellm_router.py` beside the config and loads that file by path, as a module of no package.
RESOLVE_BESIDE_A_CHECKOUT = """
import sys
from litellm.proxy.types_utils.utils import get_instance_fn

hook = get_instance_fn("serving.litellm_router.hook", config_file_path=sys.argv[1])
import serving.litellm_router as real

assert hook is real.hook, (hook, real.hook)
print("one hook:", type(hook).__module__, type(hook).__qualname__)
"""


def _checkout_like(directory: Path) -> Path:
    """A LiteLLM config path in `directory`, beside a `serving` folder that is this package."""
    import serving

    (directory / "serving").symlink_to(Path(serving.__file__).resolve().parent, target_is_directory=True)
    return _write(directory / "litellm.yaml", {"litellm_settings": {"callbacks": ["serving.litellm_router.hook"]}})


def test_a_config_beside_the_serving_folder_gets_the_one_real_hook(tmp_path: Path) -> None:
    """In a fresh process, as the proxy starts: the copy LiteLLM loads by path made a hook whose config model
    pydantic could not build (`LiteLLMRouterConfig is not fully defined`), and the proxy did not start."""
    import subprocess
    import sys

    config = _checkout_like(tmp_path)
    promptier_config = _write(tmp_path / "promptier.yaml", {"tiers": GROUPS, "fallback_tier": "medium",
                                                            "classifier": {"embedded": True}})
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, CONFIG_ENV: str(promptier_config), "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", RESOLVE_BESIDE_A_CHECKOUT, str(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "one hook: serving.litellm_router PromptierRouter" in done.stdout


def test_a_copy_loaded_by_path_hands_out_the_hook_already_built(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """In a process that already imported the module: the copy built a second hook (a second model, or a
    ConfigError without PROMPTIER_LITELLM_CONFIG) instead of handing out the one there is."""
    from litellm.proxy.types_utils.utils import get_instance_fn

    import serving.litellm_router as module

    built = object()
    monkeypatch.setattr(module, "_hook", built)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert get_instance_fn("serving.litellm_router.hook", config_file_path=str(_checkout_like(tmp_path))) is built
