"""Tenants end to end: the openai SDK through a real dispatcher on a real port, with recording upstreams,
a real gRPC classifier, spend kept in SQLite (shared by worker processes) or in a real Redis server."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.dispatch.budget_pacing import window_of
from serving.dispatch.decision_log import DECISION_SCHEMA_VERSION
from serving.dispatch.dispatch_config import ConfigError, DispatcherConfig, load_dispatcher_config
from serving.dispatch.spend_store import RedisSpendStore, SqliteSpendStore
from serving.dispatch.stream_meter import estimated_usage
from tests.dispatcher_harness import IMAGE, Dispatcher, dispatcher_config, restricted, wait_for_health
from tests.fake_upstream import MISSING, USAGE, Upstream
from tests.grpc_server import EASY, HARD, ServerThread, stop_supervisor, worker_serving
from tests.redis_server import RedisServer

PRICES = {"small": (0.2, 0.2), "medium": (0.9, 0.9), "large": (1.25, 5.0)}  # the test model's, per Mtok


def _rows(path: Path, count: int, wait_s: float = 10.0) -> list[dict]:
    """The decision log once it has `count` lines (streams are logged after their last byte)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            break
        time.sleep(0.02)
    return [json.loads(line) for line in path.read_text().splitlines()]


def _cost(tier: str, prompt_tokens: float, completion_tokens: float) -> float:
    price_in, price_out = PRICES[tier]
    return (prompt_tokens * price_in + completion_tokens * price_out) / 1e6


def _metrics(port: int) -> dict[tuple[str, tuple], float]:
    # The operator key of the tests that set one (the others' /metrics is open to any caller).
    headers = {"connection": "close", "authorization": "Bearer ops-key"}
    text = httpx.get(f"http://127.0.0.1:{port}/metrics/", headers=headers).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _eventually(condition, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def _ask(client: openai.OpenAI, text: str, model: str = "promptier") -> tuple[str, dict]:
    """(tier, headers) of one chat completion."""
    raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": text}])
    raw.parse()
    return raw.headers["x-promptier-tier"], dict(raw.headers)


@pytest.fixture
def started(fresh: dict[str, Upstream], grpc_classifier, tmp_path: Path) -> Iterator:
    """Starts dispatchers with tenants (each logs to its own file); stops them after the test."""
    running: list[Dispatcher] = []

    def start(log_name: str = "decisions.jsonl", **extra: object) -> Dispatcher:
        running.append(Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / log_name, **extra)))
        return running[-1]

    yield start
    for dispatcher in running:
        dispatcher.stop()


def test_each_key_gets_its_tenants_policy_and_unknown_keys_are_refused(
        started, fresh: dict[str, Upstream], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESEARCH_KEYS", "research-key-1, research-key-2")
    monkeypatch.setenv("SUPPORT_KEYS", "support-key")
    monkeypatch.setenv("LEGACY_KEYS", "legacy-key")
    dispatcher = started(inbound_api_keys_env="LEGACY_KEYS", tenants={
        "research": {"api_keys_env": "RESEARCH_KEYS", "default_mode": "quality"},
        "support": {"api_keys_env": "SUPPORT_KEYS", "default_mode": "cost", "allowed_tiers": ["small", "medium"]}})
    research, support = dispatcher.client(api_key="research-key-2"), dispatcher.client(api_key="support-key")
    legacy = dispatcher.client(api_key="legacy-key")

    tier, headers = _ask(research, HARD)
    assert (tier, headers["x-promptier-mode"]) == ("large", "quality")
    received_by_large = len(fresh["large"].received)
    tier, headers = _ask(support, HARD)  # the classifier chose among support's tiers only
    assert tier in ("small", "medium") and headers["x-promptier-mode"] == "cost"
    assert len(fresh["large"].received) == received_by_large
    tier, headers = _ask(legacy, HARD)  # inbound_api_keys_env's keys: the default tenant, as before
    assert (tier, headers["x-promptier-mode"]) == ("large", "balanced")
    assert "x-promptier-budget-pressure" not in headers  # no budget, nothing to say
    with pytest.raises(openai.PermissionDeniedError) as refused:
        support.chat.completions.create(model="promptier/tier/large", messages=[{"role": "user", "content": EASY}])
    assert refused.value.code == "tier_not_allowed"
    with pytest.raises(openai.AuthenticationError):
        dispatcher.client(api_key="nobody").chat.completions.create(
            model="promptier", messages=[{"role": "user", "content": EASY}])
    keyless = httpx.post(f"{dispatcher.base_url}/chat/completions",
                         json={"model": "promptier", "messages": [{"role": "user", "content": EASY}]})
    assert keyless.status_code == 401 and keyless.json()["error"]["code"] == "invalid_api_key"
    # The models list, as OpenAI's, needs a key, and offers a tenant only the tier pins it may use.
    pins = {model.id for model in support.models.list() if "/tier/" in model.id}
    assert pins == {"promptier/tier/small", "promptier/tier/medium"}
    with pytest.raises(openai.NotFoundError) as unknown:  # nor does the message of a model that does not exist
        support.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": EASY}])
    assert "promptier/tier/medium" in str(unknown.value) and "promptier/tier/large" not in str(unknown.value)
    assert "promptier/tier/large" in {model.id for model in research.models.list()}
    listed = httpx.get(f"{dispatcher.base_url}/models")
    assert listed.status_code == 401 and listed.json()["error"]["code"] == "invalid_api_key"
    # A failing tier escalates only to tiers the tenant may use: support's medium has nowhere to go.
    fresh["medium"].behaviour = "500"
    received_by_large = len(fresh["large"].received)
    with pytest.raises(openai.APIStatusError) as failed:
        support.chat.completions.create(model="promptier/tier/medium", messages=[{"role": "user", "content": EASY}])
    assert failed.value.status_code == 502 and len(fresh["large"].received) == received_by_large

    rows = _rows(tmp_path / "decisions.jsonl", 4)
    assert [row["tenant"] for row in rows] == ["research", "support", "default", "support"]
    assert rows[-1]["status"] == 502 and all(row["schema_version"] == DECISION_SCHEMA_VERSION for row in rows)
    assert rows[0]["scores"] is not None and set(rows[0]["scores"]) == {"small", "medium", "large"}
    metrics = _metrics(dispatcher.port)
    tenants = {dict(labels)["tenant"] for (name, labels) in metrics if name.startswith("promptier_dispatch_tenant")}
    assert tenants == {"research", "support", "default"}  # refused keys label nothing
    served = metrics[("promptier_dispatch_tenant_requests_total", (("tenant", "support"), ("tier", "none")))]
    assert served == 1.0  # the 502
    everything = (tmp_path / "decisions.jsonl").read_text() + httpx.get(f"http://127.0.0.1:{dispatcher.port}/metrics/").text
    assert not any(key in everything for key in ("research-key", "support-key", "legacy-key"))


def _budgeted(tmp_path: Path, usd: float, **budget: object) -> dict:
    return {"api_keys_env": "SEARCH_KEYS", "budget": {"usd": usd, "period": "month", **budget}}


def _seed(store_path: Path, tenant: str, usd: float, period: str = "month") -> None:
    """Spend written by another process (another dispatcher worker, say)."""
    window = window_of(period, time.time())  # type: ignore[arg-type]
    store = SqliteSpendStore(store_path)
    store.add({(tenant, window.key): usd}, {window.key: window.end})
    store.close()


@pytest.fixture
def mid_month(monkeypatch: pytest.MonkeyPatch) -> Callable[[], float]:
    """A clock in the middle of this month, for the dispatcher's tenants and the test alike. Pacing's band
    is a share of what is left of the period: in a month's last minutes it is worth less than one
    request, and a test of pressure between 0 and 1 would depend on the date it runs."""
    import serving.dispatch.tenants

    now = time.time()
    month = window_of("month", now)
    shift = (month.start + month.end) / 2 - now

    def clock() -> float:
        return time.time() + shift

    monkeypatch.setattr(serving.dispatch.tenants, "time", SimpleNamespace(time=clock))  # its only use of time
    return clock


def test_pacing_moves_requests_to_cheaper_tiers_as_spend_runs_ahead_of_the_budget(
        started, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mid_month: Callable[[], float]) -> None:
    monkeypatch.setenv("SEARCH_KEYS", "search-key")
    monkeypatch.setenv("OPERATOR_KEYS", "ops-key")
    store_path = tmp_path / "spend.sqlite3"
    budget = 100.0
    dispatcher = started(tenants={"search": _budgeted(tmp_path, budget, max_quality_loss=1.0)},
                         spend_store={"path": str(store_path), "refresh_ms": 50},
                         savings_page={"operator_keys_env": "OPERATOR_KEYS"})
    client = dispatcher.client(api_key="search-key")

    def pressure_after_request() -> tuple[str, float, str]:
        tier, headers = _ask(client, HARD)
        return tier, float(headers["x-promptier-budget-pressure"]), headers["x-promptier-reason"]

    tier, pressure, reason = pressure_after_request()
    assert (tier, reason) == ("large", "classified") and pressure == 0.0  # on budget: the policy's tier
    window = window_of("month", mid_month())
    elapsed = window.elapsed(mid_month())

    def ahead_by(share_of_band: float) -> float:
        """Spend that puts the tenant `share_of_band` of the pacing band ahead of what it may spend."""
        return budget * elapsed + share_of_band * 0.1 * budget * (1 - elapsed)

    _seed(store_path, "search", ahead_by(0.5))  # the store has other processes' spend: seen within refresh_ms
    seen: list[tuple[str, float, str]] = []
    assert _eventually(lambda: seen.append(pressure_after_request()) or abs(seen[-1][1] - 0.5) < 0.02), seen[-1]
    _seed(store_path, "search", ahead_by(1.5) - ahead_by(0.5))
    assert _eventually(lambda: seen.append(pressure_after_request()) or seen[-1][1] == 1.0), seen[-1]
    assert seen[-1][0] == "small" and seen[-1][2] == "paced"  # full pressure: the cheapest tier
    tier, headers = _ask(client, EASY)  # already the cheapest tier: nothing to move
    assert (tier, headers["x-promptier-reason"]) == ("small", "classified")

    rows = _rows(tmp_path / "decisions.jsonl", 2 + len(seen))
    paced = [row for row in rows if row["reason"] == "paced"]
    assert paced and all(row["unpaced_tier"] == "large" and row["tier"] == "small" for row in paced)
    assert all(row["confidence"] == row["scores"]["small"] for row in paced)  # the served tier's, not large's
    assert all(row["tenant"] == "search" and row["budget_pressure"] is not None for row in rows)
    # Pressure only rose as spend ran ahead, and routing followed it toward cheaper tiers.
    pressures = [round(row["budget_pressure"], 4) for row in rows if row["prompt"] == HARD]
    assert pressures == sorted(pressures) and pressures[0] == 0.0 and pressures[-1] == 1.0
    metrics = _metrics(dispatcher.port)
    assert metrics[("promptier_dispatch_tenant_budget_moves_total", (("cause", "paced"), ("tenant", "search")))] == len(
        paced)
    assert metrics[("promptier_dispatch_tenant_budget_pressure", (("tenant", "search"),))] == 1.0
    assert metrics[("promptier_dispatch_tenant_budget_usd", (("tenant", "search"),))] == budget
    # This dispatcher's own spend reached the shared store, on top of what was seeded.
    logged = sum(row["cost_usd"] for row in rows)
    key = ("search", window.key)
    assert _eventually(lambda: abs(SqliteSpendStore(store_path).totals([key])[key] - ahead_by(1.5) - logged) < 1e-9)
    health = httpx.get(f"http://127.0.0.1:{dispatcher.port}/health", headers={"authorization": "Bearer ops-key"})
    assert health.json()["spend_store_state"] == "ok" and health.json()["tenants_with_budgets"] == ["search"]
    assert str(store_path) in health.json()["spend_store"] and "upstream_failures" in health.json()
    # Anyone else (a load balancer, a tenant) learns that the store works, not which tenants exist or where it is.
    for headers in ({}, {"authorization": "Bearer search-key"}):
        public = httpx.get(f"http://127.0.0.1:{dispatcher.port}/health", headers=headers).json()
        assert public["status"] == "ok" and public["spend_store_state"] == "ok"
        details = {"tenants_with_budgets", "spend_store", "classifier_source", "upstream_failures"}
        assert not details & set(public), public


def test_a_spent_budget_routes_to_the_cheapest_tier_or_answers_429_as_configured(
        started, fresh: dict[str, Upstream], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRUGAL_KEYS", "frugal-key")
    monkeypatch.setenv("STRICT_KEYS", "strict-key")
    store_path = tmp_path / "spend.sqlite3"
    _seed(store_path, "frugal", 2.0)
    _seed(store_path, "strict", 2.0, "day")
    dispatcher = started(spend_store={"path": str(store_path), "refresh_ms": 50}, exploration_share=0.5, tenants={
        "frugal": {"api_keys_env": "FRUGAL_KEYS", "budget": {"usd": 2.0, "on_exhausted": "cheapest"}},
        "strict": {"api_keys_env": "STRICT_KEYS", "allowed_tiers": ["medium", "large"],
                   "budget": {"usd": 2.0, "period": "day", "on_exhausted": "reject"}}})
    assert _eventually(lambda: all(
        _metrics(dispatcher.port).get(("promptier_dispatch_tenant_period_spend_usd", (("tenant", name),))) == 2.0
        for name in ("frugal", "strict")))  # both read from the store
    frugal = dispatcher.client(api_key="frugal-key")
    tier, headers = _ask(frugal, HARD)
    assert (tier, headers["x-promptier-reason"], headers["x-promptier-budget-pressure"]) == (
        "small", "budget_exhausted", "1.000")
    tier, headers = _ask(frugal, EASY, model="promptier/tier/large")  # pinned requests too: the budget is spent
    assert (tier, headers["x-promptier-reason"]) == ("small", "budget_exhausted")

    strict = dispatcher.client(api_key="strict-key")
    with pytest.raises(openai.RateLimitError) as refused:
        strict.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
    error = refused.value
    assert error.code == "budget_exhausted" and error.type == "insufficient_quota"
    assert "strict" in error.message and "budget" in error.message
    day = window_of("day", time.time())
    assert 0 < int(error.response.headers["retry-after"]) <= day.end - time.time() + 1  # the period's end
    # Refused before any upstream: no tier or upstream model named (the key may not even use them).
    assert error.response.headers["x-promptier-reason"] == "budget_exhausted"
    assert not {"x-promptier-tier", "x-promptier-upstream-model"} & set(error.response.headers)

    rows = _rows(tmp_path / "decisions.jsonl", 3)
    assert [(row["tenant"], row["tier"], row["status"], row["reason"]) for row in rows] == [
        ("frugal", "small", 200, "budget_exhausted"), ("frugal", "small", 200, "budget_exhausted"),
        ("strict", None, 429, "budget_exhausted")]
    assert rows[0]["unpaced_tier"] == "large" and rows[1]["unpaced_tier"] == "large"
    metrics = _metrics(dispatcher.port)
    assert metrics[("promptier_dispatch_tenant_budget_refusals_total", (("tenant", "strict"),))] == 1.0
    # Easy prompts stay on the cheapest tier, where the policy puts them: were a spent budget's requests
    # explored (half of them, each to one of three tiers), all twenty would stay there 3 times in 10,000.
    assert {_ask(frugal, f"{EASY} ({i})")[0] for i in range(20)} == {"small"}
    assert not any(row["explored"] for row in _rows(tmp_path / "decisions.jsonl", 23))

    # A spent budget does not escalate: with the cheapest upstream down, every request would otherwise
    # go on to a dearer tier and overrun the budget for as long as the outage lasts.
    fresh["small"].behaviour = "500"
    try:
        with pytest.raises(openai.InternalServerError) as failed:
            frugal.chat.completions.create(model="promptier", messages=[{"role": "user", "content": HARD}])
    finally:
        fresh["small"].behaviour = "ok"
    assert failed.value.status_code == 502 and "spent its budget" in failed.value.message
    assert failed.value.response.headers["x-promptier-failed-tiers"] == "small"
    assert [(row["tier"], row["status"], row["failed_tiers"]) for row in _rows(tmp_path / "decisions.jsonl", 24)
            ][-1] == (None, 502, ["small"])


def test_streams_of_a_budgeted_tenant_are_charged_from_usage_or_counted_text(
        started, fresh: dict[str, Upstream], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEARCH_KEYS", "search-key")
    store_path = tmp_path / "spend.sqlite3"
    dispatcher = started(tenants={"search": _budgeted(tmp_path, 50.0)},
                         spend_store={"path": str(store_path), "refresh_ms": 50})
    search = dispatcher.client(api_key="search-key")
    messages = [{"role": "user", "content": EASY}]

    # The caller did not ask for usage: the dispatcher does, and takes the usage chunk out of the stream.
    chunks = list(search.chat.completions.create(model="promptier", messages=messages, stream=True))
    assert [chunk.choices[0].delta.content for chunk in chunks] == [f"small-{i} " for i in range(5)]
    assert all(chunk.usage is None for chunk in chunks)
    sent = fresh["small"].received[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}
    # The caller asked for it: it gets the usage chunk, as the upstream sent it.
    chunks = list(search.chat.completions.create(model="promptier", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert [chunk.usage.total_tokens for chunk in chunks if chunk.usage] == [17]
    # An upstream that sends no usage: the answer is charged by its characters (4 per token).
    fresh["small"].usage = MISSING
    chunks = list(search.chat.completions.create(model="promptier", messages=messages, stream=True))
    answer = "".join(chunk.choices[0].delta.content for chunk in chunks if chunk.choices)
    _rows(tmp_path / "decisions.jsonl", 3)  # logged in order: the stream first
    search.chat.completions.create(model="promptier", messages=messages)  # and without streaming

    rows = _rows(tmp_path / "decisions.jsonl", 4)
    assert [row["usage"]["total_tokens"] for row in rows[:2]] == [17, 17]
    assert rows[0]["cost_usd"] == pytest.approx(_cost("small", 12, 5)) and rows[0]["note"] is None
    counted = estimated_usage(len(EASY), len(answer))
    assert rows[2]["cost_usd"] == pytest.approx(_cost("small", counted["prompt_tokens"], counted["completion_tokens"]))
    assert "4 characters per token" in rows[2]["note"] and "no usage" in rows[2]["note"]
    assert rows[2]["usage"] == counted  # the counts it was charged by, as the savings page reads them
    counted = estimated_usage(len(EASY), len("answer from small"))
    assert rows[3]["cost_usd"] == pytest.approx(_cost("small", counted["prompt_tokens"], counted["completion_tokens"]))
    assert rows[3]["usage"] == counted
    key = ("search", window_of("month", time.time()).key)
    total = sum(row["cost_usd"] for row in rows)
    assert _eventually(lambda: SqliteSpendStore(store_path).totals([key])[key] == pytest.approx(total))
    # A stream the upstream breaks off is charged by what was relayed, and its note says it was cut.
    fresh["small"].behaviour = "break"
    with contextlib.suppress(openai.APIError):  # the stream ends with a stream_interrupted event
        list(search.chat.completions.create(model="promptier", messages=messages, stream=True))
    cut = _rows(tmp_path / "decisions.jsonl", 5)[4]
    assert cut["status"] == 599 and cut["cost_usd"] > 0 and "cut before its usage came" in cut["note"]
    # Asked to stream, an upstream that answers with one whole body: charged by the usage in it, which an
    # event stream's meter never found (the answer was charged as 4 characters of prompt and nothing else).
    fresh["small"].behaviour, fresh["small"].usage = "no_stream", USAGE
    with httpx.stream("POST", f"{dispatcher.base_url}/chat/completions", headers={"authorization": "Bearer search-key"},
                      json={"model": "promptier", "messages": messages, "stream": True}) as whole:
        assert whole.status_code == 200 and json.loads(whole.read())["usage"] == USAGE
    unstreamed = _rows(tmp_path / "decisions.jsonl", 6)[5]
    assert unstreamed["usage"]["total_tokens"] == USAGE["total_tokens"] and unstreamed["note"] is None
    assert unstreamed["cost_usd"] == pytest.approx(_cost("small", USAGE["prompt_tokens"], USAGE["completion_tokens"]))
    fresh["small"].behaviour = "ok"

    # A tenant without a budget: the stream passes through untouched, as it always has.
    monkeypatch.setenv("OTHER_KEYS", "other-key")
    plain = started("plain.jsonl", tenants={"other": {"api_keys_env": "OTHER_KEYS"}})
    list(plain.client(api_key="other-key").chat.completions.create(model="promptier", messages=messages, stream=True))
    assert "stream_options" not in fresh["small"].received[-1]["body"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_budgeted_caller_that_leaves_before_the_answer_pays_for_its_prompt(
        started, fresh: dict[str, Upstream], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    """The upstream was sent the prompt and read it: a caller whose timeout is shorter than the answer (and
    whose SDK retries it) must not spend on a hosted tier for free. The prompt is charged by count; a tenant
    without a budget is logged as before, without a cost."""
    monkeypatch.setenv("SEARCH_KEYS", "search-key")
    monkeypatch.setenv("OTHER_KEYS", "other-key")
    store_path = tmp_path / "spend.sqlite3"
    dispatcher = started(tenants={"search": _budgeted(tmp_path, 50.0), "other": {"api_keys_env": "OTHER_KEYS"}},
                         spend_store={"path": str(store_path), "refresh_ms": 50})
    fresh["large"].behaviour = "generating"
    for key in ("search-key", "other-key"):
        with pytest.raises(openai.APITimeoutError):
            dispatcher.client(api_key=key, timeout=0.4).chat.completions.create(
                model="promptier/tier/large", stream=stream, messages=[{"role": "user", "content": HARD}])
        assert fresh["large"].cancelled.wait(10)
        fresh["large"].cancelled.clear()
    search, other = _rows(tmp_path / "decisions.jsonl", 2)
    counted = estimated_usage(len(HARD), 0)
    assert (search["status"], search["tier"], search["usage"]) == (499, "large", counted)
    assert search["cost_usd"] > 0 and search["cost_usd"] == pytest.approx(_cost("large", counted["prompt_tokens"], 0))
    assert "the caller left" in search["note"] and "4 characters per token" in search["note"]
    key = ("search", window_of("month", time.time()).key)
    assert _eventually(lambda: SqliteSpendStore(store_path).totals([key])[key] == pytest.approx(search["cost_usd"]))
    assert (other["status"], other["cost_usd"], other["usage"], other["note"]) == (499, None, None, None)


def test_two_dispatcher_workers_share_one_sqlite_store(fresh: dict[str, Upstream], trained_artifact: Path,
                                                       tmp_path: Path) -> None:
    from serving.bench.ports import free_port

    store_path = tmp_path / "spend.sqlite3"
    log_path = tmp_path / "decisions.jsonl"
    config = tmp_path / "dispatcher.yaml"
    config.write_text(json.dumps({
        "classifier": {"embedded": True, "model": str(trained_artifact), "timeout_ms": 500},
        "tiers": {name: {"base_url": u.url, "model": f"{name}-upstream-model"} for name, u in fresh.items()},
        "fallback_tier": "large", "decision_log": {"path": str(log_path), "store_prompts": True},
        "tenants": {"search": {"api_keys_env": "SEARCH_KEYS", "budget": {"usd": 1000}}},
        "spend_store": {"path": str(store_path), "refresh_ms": 50}}))
    port = free_port()
    parent = subprocess.Popen([sys.executable, "-m", "classifier.cli", "dispatch", "--config", str(config),
                               "--port", str(port), "--workers", "2"], env={**os.environ, "SEARCH_KEYS": "k"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def post(text: str) -> int:
        """The worker that answered one request, sent on a connection of its own."""
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("POST", "/v1/chat/completions", headers={
                "content-type": "application/json", "authorization": "Bearer k"},
                body=json.dumps({"model": "promptier", "messages": [{"role": "user", "content": text}]}))
            reply = connection.getresponse()
            reply.read()
            assert reply.status == 200
            assert connection.sock is not None
            return worker_serving(parent.pid, port, connection.sock.getsockname()[1])
        finally:
            connection.close()

    try:
        wait_for_health(port, parent)
        workers: set[int] = set()
        sent = 0
        deadline = time.monotonic() + 60
        # A lookup that cannot place a connection (-1: psutil raced the process) places nothing.
        while (len(workers - {-1}) < 2 or sent < 20) and time.monotonic() < deadline:
            workers.add(post(HARD if sent % 2 else EASY))
            sent += 1
        assert len(workers - {-1}) == 2, workers  # both processes served and charged
        rows = _rows(log_path, sent)
        assert len(rows) == sent and all(row["cost_usd"] for row in rows)
        total = sum(row["cost_usd"] for row in rows)
        key = ("search", window_of("month", time.time()).key)
        # Every request of both processes is in the one store, once.
        assert _eventually(lambda: SqliteSpendStore(store_path).totals([key])[key] == pytest.approx(total, rel=1e-9))
        spend = sum(value for (name, labels), value in _metrics(port).items()
                    if name == "promptier_dispatch_tenant_spend_usd_total")
        assert spend == pytest.approx(total)  # /metrics adds up both workers
    finally:
        stop_supervisor(parent)
        parent.wait(30)


def test_dispatchers_on_several_hosts_share_spend_through_redis(
        redis_server: RedisServer, started, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # redis_server comes first so that it is set up first and stopped last: the dispatchers stop while
    # their store still answers (otherwise their ledgers log a failed read into a closed capture).
    monkeypatch.setenv("SEARCH_KEYS", "search-key")
    monkeypatch.setenv("SPEND_REDIS_URL", redis_server.url)
    store = {"kind": "redis", "url_env": "SPEND_REDIS_URL", "key_prefix": "test", "refresh_ms": 50,
             "journal_dir": str(tmp_path / "journal")}
    monkeypatch.setenv("OPERATOR_KEYS", "ops-key")
    first = started("first.jsonl", tenants={"search": _budgeted(tmp_path, 10.0)}, spend_store=store,
                    savings_page={"operator_keys_env": "OPERATOR_KEYS"})
    second = started("second.jsonl", tenants={"search": _budgeted(tmp_path, 10.0)}, spend_store=store)
    for _ in range(3):
        _ask(first.client(api_key="search-key"), HARD)
    _ask(second.client(api_key="search-key"), EASY)
    rows = _rows(tmp_path / "first.jsonl", 3) + _rows(tmp_path / "second.jsonl", 1)
    total = sum(row["cost_usd"] for row in rows)
    key = ("search", window_of("month", time.time()).key)
    reader = RedisSpendStore(redis_server.url, prefix="test")
    assert _eventually(lambda: reader.totals([key])[key] == pytest.approx(total))
    # Each dispatcher sees the other's spend: the period's spend, as both report it, is the sum.
    for dispatcher in (first, second):
        assert _eventually(lambda d=dispatcher: _metrics(d.port).get(
            ("promptier_dispatch_tenant_period_spend_usd", (("tenant", "search"),))) == pytest.approx(total))
    health = httpx.get(f"http://127.0.0.1:{first.port}/health", headers={"authorization": "Bearer ops-key"})
    assert "redis 127.0.0.1" in health.json()["spend_store"]


def _load(tmp_path: Path, text: str) -> DispatcherConfig:
    path = tmp_path / "dispatcher.yaml"
    path.write_text("tiers: {small: {base_url: 'http://x/v1', model: s}, large: {base_url: 'http://x/v1', model: l}}\n"
                    "fallback_tier: large\n" + text)
    return load_dispatcher_config(path)


@pytest.mark.parametrize(("section", "error"), [
    ("tenants: {a: {api_keys_env: A_KEYS, allowed_tiers: [small, huge]}}",
     r"tenants\.a\.allowed_tiers: \['huge'\] are not configured tiers"),
    ("tenants: {a: {default_mode: cheap, api_keys_env: A_KEYS}}", r"tenants\.a\.default_mode: .*'cheap' is not one of"),
    ("tenants: {a: {}}", r"tenants\.a: api_keys_env is required"),
    ("tenants: {all: {api_keys_env: A_KEYS}}", r"tenants\.all: the name is taken by the savings page's total"),
    ("tenants: {a: {api_keys_env: UNSET_KEYS_VAR}}", r"tenants\.a\.api_keys_env names UNSET_KEYS_VAR, which holds no"),
    ("tenants: {a: {api_keys_env: A_KEYS}, b: {api_keys_env: SAME_KEYS}}", r"tenants\.b: one of its keys is also a key "
                                                                         r"of the tenant 'a'"),
    ("tenants: {a: {api_keys_env: A_KEYS}, b: {api_keys_env: A_KEYS}}", r"\['A_KEYS'\] named by more than one tenant"),
    ("savings_page: {operator_keys_env: UNSET_KEYS_VAR}", r"operator_keys_env names UNSET_KEYS_VAR, which holds no"),
    ("tenants: {a: {api_keys_env: ACCENTED_KEYS}}", r"tenants\.a\.api_keys_env: a key in ACCENTED_KEYS has a "
                                                    r"character other than printable ASCII"),
    ("inbound_api_keys_env: ACCENTED_KEYS", r"inbound_api_keys_env: a key in ACCENTED_KEYS has a character"),
    ("tenants: {a: {api_keys_env: A_KEYS}}\nsavings_page: {operator_keys_env: SAME_KEYS}",
     r"operator_keys_env: one of its keys is also a key of the tenant 'a'"),
    ("tenants: {a: {api_keys_env: A_KEYS}}\nsavings_page: {operator_keys_env: A_KEYS}",
     r"operator_keys_env: one of its keys is also a key of the tenant 'a'"),
    ("inbound_api_keys_env: A_KEYS\nsavings_page: {operator_keys_env: A_KEYS}",
     r"operator_keys_env: one of its keys is also a key of the tenant 'default'"),
    ("inbound_api_keys_env: A_KEYS\ntenants: {a: {api_keys_env: A_KEYS}}",
     r"whose keys belong to the tenant 'default'"),
    ("tenants: {default: {api_keys_env: A_KEYS}}", r"tenants\.default: its keys are inbound_api_keys_env's"),
    ("tenants: {'team a': {api_keys_env: A_KEYS}}", r"tenants\.team a: a tenant name is 1-64 letters"),
    ("tenants: {a: {api_keys_env: A_KEYS, budget: {usd: 0}}}", r"tenants\.a\.budget\.usd: Input should be greater"),
    ("tenants: {a: {api_keys_env: A_KEYS, budget: {usd: 5, period: week}}}", r"budget\.period: Input should be 'day'"),
    ("tenants: {a: {api_keys_env: A_KEYS, budget: {usd: 5, on_exhausted: wait}}}", r"on_exhausted: Input should be"),
    ("tenants: {a: {api_keys_env: A_KEYS, budget: {usd: 5, max_quality_loss: 2}}}", r"max_quality_loss: Input should"),
    ("tenants: {a: {api_keys_env: A_KEYS, budget: {usd: .inf}}}", r"budget\.usd: Input should be a finite number"),
    ("tenants: {a: {api_keys_env: A_KEYS, budget: {usd: '500'}}}", r"budget\.usd: Input should be a valid number"),
    ("tenants: {a: {api_keys_env: A_KEYS, budget: {usd: 5, pacing: 'yes'}}}", r"pacing: Input should be a valid bool"),
    ("tenants: {a: {api_keys_env: A_KEYS, budget: {usd: 5, pace: true}}}", r"budget\.pace: Extra inputs are not"),
    ("spend_store: {kind: redis}", r"spend_store: Value error, kind: redis needs url_env"),
    ("spend_store: {kind: redis, url_env: UNSET_REDIS_URL}", r"UNSET_REDIS_URL is not set"),
    ("spend_store: {url_env: X}", r"url_env and key_prefix apply only with kind: redis"),
    ("spend_store: {kind: redis, url_env: X, path: s.db}", r"path applies only with kind: sqlite"),
])
def test_tenant_config_mistakes_are_refused_with_the_field_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                section: str, error: str) -> None:
    monkeypatch.setenv("A_KEYS", "secret-a")
    monkeypatch.setenv("SAME_KEYS", "other, secret-a")
    # Servers read header bytes as Latin-1, so this key, sent as UTF-8, would arrive as other characters.
    monkeypatch.setenv("ACCENTED_KEYS", "plain, secret-é")
    with pytest.raises(ConfigError, match=error) as raised:
        _load(tmp_path, section)
    assert "secret-a" not in str(raised.value) and "secret-é" not in str(raised.value)  # a key is never in an error


def test_check_reports_tenants_and_their_store(fresh: dict[str, Upstream], trained_artifact: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from serving.cli import app

    monkeypatch.setenv("SEARCH_KEYS", "k1")
    path = tmp_path / "dispatcher.yaml"
    path.write_text(json.dumps({
        "classifier": {"embedded": True, "model": str(trained_artifact)}, "fallback_tier": "large",
        "tiers": {name: {"base_url": upstream.url, "model": name} for name, upstream in fresh.items()},
        "tenants": {"search": {"api_keys_env": "SEARCH_KEYS", "budget": {"usd": 300, "on_exhausted": "reject"}},
                    "default": {"default_mode": "cost"}},
        "spend_store": {"path": str(tmp_path / "store" / "spend.sqlite3")}}))
    result = CliRunner().invoke(app, ["dispatch", "--config", str(path), "--check"])
    assert result.exit_code == 0, result.output
    assert "tenants: search ($300 per month, paced, then reject), default (no budget)" in result.output
    assert "will be created" in result.output and not (tmp_path / "store").exists()
    (tmp_path / "store").write_text("a file where the store's folder would go")
    result = CliRunner().invoke(app, ["dispatch", "--config", str(path), "--check"])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output
    (tmp_path / "store").unlink()
    monkeypatch.delenv("SEARCH_KEYS")
    result = CliRunner().invoke(app, ["dispatch", "--config", str(path), "--check"])
    assert result.exit_code == 2 and "SEARCH_KEYS, which holds no keys" in result.output


def test_stream_meter_relays_whole_events_and_takes_out_only_the_usage_chunk_it_asked_for() -> None:
    from serving.dispatch.stream_meter import MAX_EVENT_BYTES, StreamMeter

    def event(payload: dict, end: bytes = b"\n\n") -> bytes:
        return b"data: " + json.dumps(payload).encode() + end

    chunk = event({"choices": [{"delta": {"content": "héllo", "tool_calls": [{"function": {"arguments": "{}"}}]}}],
                   "usage": None})
    usage_chunk = event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}, b"\r\n\r\n")
    stream = b": keep-alive\n\n" + chunk + usage_chunk + b"data: [DONE]\n\n"
    for drop in (True, False):
        meter = StreamMeter(drop_usage_chunk=drop)
        relayed = b"".join(meter.feed(stream[i:i + 5]) for i in range(0, len(stream), 5)) + meter.finish()
        expected = stream.replace(usage_chunk, b"") if drop else stream
        assert relayed == expected  # byte for byte, whatever the chunking
        assert meter.usage == {"prompt_tokens": 3, "completion_tokens": 2} and meter.completion_chars == 7
    # A choiceless chunk without usage (Azure's prompt-filter results) is the caller's: never taken out.
    filtered = event({"choices": [], "prompt_filter_results": []})
    meter = StreamMeter(drop_usage_chunk=True)
    assert meter.feed(filtered) == filtered and meter.usage is None
    # A body that is no event stream is relayed as it comes, not held whole.
    meter = StreamMeter(drop_usage_chunk=True)
    blob = b"x" * (MAX_EVENT_BYTES + 1)
    assert meter.feed(blob) == blob and meter.completion_chars == len(blob) and meter.finish() == b""


def test_a_tenants_tiers_and_budget_never_send_a_request_to_a_tier_that_cannot_serve_it(
        fresh: dict[str, Upstream], grpc_classifier, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setenv("TEXT_KEYS", "text-key")
    monkeypatch.setenv("FRUGAL_KEYS", "frugal-key")
    store_path = tmp_path / "spend.sqlite3"
    _seed(store_path, "frugal", 1.0)  # spent: its requests go to the cheapest tier that can serve them
    tenants = {"text": {"api_keys_env": "TEXT_KEYS", "allowed_tiers": ["small", "large"]},
               "frugal": {"api_keys_env": "FRUGAL_KEYS", "budget": {"usd": 1.0}}}
    config = restricted(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl",
                                          spend_store={"path": str(store_path), "refresh_ms": 50}, tenants=tenants))
    dispatcher = Dispatcher(config)  # only medium takes images (tests.dispatcher_harness.SERVES)
    try:
        picture = [{"role": "user", "content": [{"type": "text", "text": HARD}, IMAGE]}]
        with pytest.raises(openai.PermissionDeniedError) as refused:
            dispatcher.client(api_key="text-key").chat.completions.create(model="promptier", messages=picture)
        assert refused.value.code == "tier_not_allowed" and "images" in refused.value.message
        # Tools: small lacks them, and the nearest tier that has them (medium) is not this key's; large is.
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
        raw = dispatcher.client(api_key="text-key").chat.completions.with_raw_response.create(
            model="promptier", messages=[{"role": "user", "content": EASY}], tools=[tool])
        assert raw.headers["x-promptier-tier"] == "large" and raw.headers["x-promptier-steered-from"] == "small"
        frugal = dispatcher.client(api_key="frugal-key")
        assert _eventually(lambda: _metrics(dispatcher.port).get(
            ("promptier_dispatch_tenant_period_spend_usd", (("tenant", "frugal"),))) == 1.0)
        raw = frugal.chat.completions.with_raw_response.create(model="promptier", messages=picture)
        assert raw.headers["x-promptier-tier"] == "medium"  # the cheapest that sees images, not small
        tier, headers = _ask(frugal, HARD)
        assert (tier, headers["x-promptier-reason"]) == ("small", "budget_exhausted")  # text only: small
        assert [upstream.received[-1]["body"]["messages"][0]["content"] for upstream in [fresh["small"]]] == [HARD]
        rows = _rows(tmp_path / "decisions.jsonl", 4)
        assert [(row["tenant"], row["tier"], row["status"]) for row in rows] == [
            ("text", None, 403), ("text", "large", 200), ("frugal", "medium", 200), ("frugal", "small", 200)]
    finally:
        dispatcher.stop()


def test_answers_given_before_the_classifier_first_answers_are_charged_once_prices_are_known(
        fresh: dict[str, Upstream], trained_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prices come from the classifier. Down since the start, every request falls back to the dearest tier:
    those answers are held and charged once it answers, not let through free of the budget."""
    from serving.bench.ports import free_port

    monkeypatch.setenv("SEARCH_KEYS", "search-key")
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "decisions.jsonl"
    dispatcher = Dispatcher(dispatcher_config(fresh, address, log, tenants={"search": _budgeted(tmp_path, 100.0)},
                                              spend_store={"path": str(tmp_path / "spend.sqlite3")}))
    classifier_server = None
    try:
        client = dispatcher.client(api_key="search-key")
        assert [_ask(client, EASY)[1]["x-promptier-reason"] for _ in range(2)] == ["fallback", "fallback"]
        held = _rows(log, 2)
        assert all(row["cost_usd"] is None and "charged to the budget once" in row["note"] for row in held)
        spend = ("promptier_dispatch_tenant_spend_usd_total", (("tenant", "search"),))
        assert _metrics(dispatcher.port).get(spend, 0.0) == 0.0
        classifier_server = ServerThread(model_dir=trained_artifact, address=address)
        # The channel reconnects after its backoff: until then requests still fall back.
        assert _eventually(lambda: _ask(client, EASY)[1]["x-promptier-reason"] == "classified", timeout_s=30)
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        assert rows[-1]["cost_usd"] > 0  # charged as it is answered, now that prices are known
        every_answer = sum(_cost(row["tier"], row["usage"]["prompt_tokens"], row["usage"]["completion_tokens"])
                           for row in rows)
        assert _metrics(dispatcher.port)[spend] == pytest.approx(every_answer)  # the held ones included
    finally:
        dispatcher.stop()
        if classifier_server is not None:
            classifier_server.stop()


def test_answers_still_unpriced_at_a_stop_are_logged_with_their_tokens(
        fresh: dict[str, Upstream], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """With the classifier down from start to stop, the held tokens were dropped without a word: the
    budget never saw them. The stop now says which tenant owes what, on which tier."""
    import logging

    from serving.bench.ports import free_port

    monkeypatch.setenv("SEARCH_KEYS", "search-key")
    log = tmp_path / "decisions.jsonl"
    dispatcher = Dispatcher(dispatcher_config(fresh, f"127.0.0.1:{free_port()}", log,
                                              tenants={"search": _budgeted(tmp_path, 100.0)},
                                              spend_store={"path": str(tmp_path / "spend.sqlite3")}))
    try:
        client = dispatcher.client(api_key="search-key")
        for _ in range(2):
            _ask(client, EASY)
        held = _rows(log, 2)
    finally:
        with caplog.at_level(logging.ERROR, logger="promptier.dispatcher"):
            dispatcher.stop()  # the stop runs in the server's thread: its last words come a moment later
            _eventually(lambda: "spend_unpriced_at_stop" in caplog.text)
    said = [json.loads(record.getMessage()) for record in caplog.records
            if "spend_unpriced_at_stop" in record.getMessage()]
    assert len(said) == 1, caplog.text
    assert said[0]["unpriced"] == [{"tenant": "search", "tier": held[0]["tier"],
                                    "prompt_tokens": sum(row["usage"]["prompt_tokens"] for row in held),
                                    "completion_tokens": sum(row["usage"]["completion_tokens"] for row in held)}]


def test_a_starting_dispatcher_reads_the_spend_before_it_serves(started, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A store slow to answer at start (a busy Redis, a cold disk) must not let a spent budget through:
    before its first read a process knows only its own spend, which after a start is none."""
    monkeypatch.setenv("STRICT_KEYS", "strict-key")
    store_path = tmp_path / "spend.sqlite3"
    _seed(store_path, "strict", 2.0, "day")
    read = SqliteSpendStore.totals

    def slow_first_read(self, keys):  # type: ignore[no-untyped-def]
        time.sleep(1.0)
        return read(self, keys)

    monkeypatch.setattr(SqliteSpendStore, "totals", slow_first_read)
    dispatcher = started(spend_store={"path": str(store_path), "refresh_ms": 60_000}, tenants={
        "strict": {"api_keys_env": "STRICT_KEYS", "budget": {"usd": 2.0, "period": "day", "on_exhausted": "reject"}}})
    with pytest.raises(openai.RateLimitError):
        dispatcher.client(api_key="strict-key").chat.completions.create(
            model="promptier", messages=[{"role": "user", "content": EASY}])


@pytest.mark.parametrize(("before", "after"), [("day", "month"), ("month", "day")])
def test_a_budget_whose_period_changes_on_reload_counts_the_spend_already_in_its_new_period(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: str, after: str) -> None:
    """A SIGHUP that changes a budget's period starts workers that read the new period's total: spend
    charged under the old period must be in it, or a spent budget opens again (here, today's spend is
    in both today's and this month's total)."""
    from prometheus_client import CollectorRegistry

    from serving.dispatch.tenants import Tenants

    monkeypatch.setenv("SEARCH_KEYS", "k1")

    def tenants(period: str) -> Tenants:
        config = DispatcherConfig.model_validate({
            "tiers": {name: {"base_url": "http://127.0.0.1:9/v1", "model": name} for name in ("small", "large")},
            "fallback_tier": "large", "spend_store": {"path": str(tmp_path / "spend.sqlite3")},
            "tenants": {"search": {"api_keys_env": "SEARCH_KEYS", "budget": {"usd": 1.0, "period": period}}}})
        started = Tenants(config, CollectorRegistry())
        started.start()
        started.wait_for_spend()
        return started

    old = tenants(before)
    old.charge(old.by_name["search"], "large", 0.75)
    old.close()  # the retiring worker writes what it charged
    new = tenants(after)
    try:
        assert new.ledger is not None
        key = ("search", window_of(after, time.time()).key)  # type: ignore[arg-type]
        assert new.ledger.spent(key) == pytest.approx(0.75)
    finally:
        new.close()


def test_retry_after_is_never_before_the_period_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1.5 s before the day ends, a caller told to retry after 1 s would be refused again: Retry-After is
    rounded up."""
    from prometheus_client import CollectorRegistry

    import serving.dispatch.tenants
    from serving.dispatch.tenants import Tenants

    monkeypatch.setenv("SEARCH_KEYS", "k1")
    config = DispatcherConfig.model_validate({
        "tiers": {name: {"base_url": "http://127.0.0.1:9/v1", "model": name} for name in ("small", "large")},
        "fallback_tier": "large", "spend_store": {"path": str(tmp_path / "spend.sqlite3")},
        "tenants": {"search": {"api_keys_env": "SEARCH_KEYS", "budget": {"usd": 1.0, "period": "day"}}}})
    tenants = Tenants(config, CollectorRegistry())
    day_end = window_of("day", time.time()).end
    for left, told in ((1.5, 2), (0.2, 1), (3600.0, 3600)):
        monkeypatch.setattr(serving.dispatch.tenants, "time", SimpleNamespace(time=lambda left=left: day_end - left))
        assert tenants.seconds_left(tenants.by_name["search"]) == told
