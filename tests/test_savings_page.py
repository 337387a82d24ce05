"""The savings page: requests through a real dispatcher, the page loaded in headless chromium, and the
numbers it shows checked against the decision log it was drawn from."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

import classifier
from serving.bench.ports import free_port
from serving.dispatch import savings_page
from serving.dispatch.decision_log import DecisionLog
from serving.dispatch.dispatch_config import DecisionLogConfig, DispatcherConfig
from serving.dispatch.savings import DEFAULT_GROUP, LogWindow, percentile, read_window, summarize
from serving.dispatch.tenants import Tenants
from tests.dispatcher_harness import IMAGE, Dispatcher, dispatcher_config, restricted, user_with_parts
from tests.fake_upstream import Upstream
from tests.grpc_server import EASY, HARD, ServerThread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NODE = shutil.which("node")
TIERS = ["small", "medium", "large"]


@pytest.fixture(autouse=True)
def no_refresh_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each load in these tests must see the log as it is (the floor only spares a busy dispatcher).
    monkeypatch.setattr(savings_page, "MIN_REFRESH_S", 0.0)


def chromium(url: str, profile: Path, *flags: str) -> str:
    """Load `url` in headless chromium, let its script fetch and render, and return stdout (the DOM
    with --dump-dom). --virtual-time-budget waits for the page's fetches before the dump or screenshot."""
    assert CHROMIUM is not None
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=20000",
               "--window-size=1280,1800", "--hide-scrollbars", *flags, url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class Cells(HTMLParser):
    """(group, field) -> (data-value, shown text) of the page's data cells, and the visible form/error."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], tuple[str, str]] = {}
        self.hidden: dict[str, bool] = {}
        self._open: tuple[str, str, str] | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.hidden[str(found["id"])] = "hidden" in found
        if "data-field" in found and "data-group" in found:
            self._open = (str(found["data-group"]), str(found["data-field"]), found.get("data-value") or "")
            self._text = ""

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if self._open is not None and tag in ("td", "p"):
            group, name, value = self._open
            self.cells[(group, name)] = (value, self._text.strip())
            self._open = None


def _log_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _expected(rows: list[dict], top_price: tuple[float, float]) -> dict:
    """What the page must show for `rows`, computed here from the log on its own."""
    costed = [row for row in rows if row["cost_usd"] is not None]
    spend = sum(row["cost_usd"] for row in costed)
    top = sum((row["usage"]["prompt_tokens"] * top_price[0] + row["usage"]["completion_tokens"] * top_price[1]) / 1e6
              for row in costed)
    latencies = sorted(row["classifier_ms"] for row in rows if row["classifier_ms"] is not None)

    def nearest_rank(q: int) -> float:
        return latencies[math.ceil(q / 100 * len(latencies)) - 1]

    return {"requests": len(rows), "spend_usd": spend, "top_tier_usd": top, "saved_usd": top - spend,
            "fallbacks": sum(row["reason"] == "fallback" or (row["steered"] or {}).get("from_reason") == "fallback"
                             for row in rows),
            "escalations": sum(row["reason"] == "escalated" for row in rows),
            "errors": sum(row["status"] >= 400 for row in rows),
            "classifier_p50_ms": nearest_rank(50), "classifier_p99_ms": nearest_rank(99),
            **{f"tier:{tier}": sum(row["tier"] == tier for row in rows) for tier in TIERS}}


def _wait_for_rows(path: Path, count: int) -> list[dict]:
    deadline = time.monotonic() + 10  # streams are logged after their last byte; bounds the wait only
    while time.monotonic() < deadline and (not path.exists() or len(_log_rows(path)) < count):
        time.sleep(0.05)
    return _log_rows(path)


@pytest.fixture
def traffic(fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Dispatcher, Path]]:
    """A dispatcher with inbound keys, after a mix of requests: classified to each tier, pinned,
    escalated, steered by a capability, without text, streamed without usage, and one that fell back
    (from a second dispatcher sharing the log, whose classifier is down)."""
    monkeypatch.setenv("SAVINGS_KEYS", "caller-key")
    monkeypatch.setenv("OPERATOR_KEYS", "operator-key")
    log = tmp_path / "decisions.jsonl"
    running = Dispatcher(restricted(dispatcher_config(fresh, grpc_classifier.target, log,
                                                      inbound_api_keys_env="SAVINGS_KEYS",
                                                      savings_page={"operator_keys_env": "OPERATOR_KEYS"})))
    client = running.client(api_key="caller-key")
    for _ in range(3):
        client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
    for _ in range(2):
        client.chat.completions.create(model="promptier/quality", messages=[{"role": "user", "content": HARD}])
    client.chat.completions.create(model="promptier/tier/medium", messages=[{"role": "user", "content": EASY}])
    client.chat.completions.create(model="promptier", messages=user_with_parts(EASY, IMAGE))
    client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": ""}])
    for _ in client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}],
                                            stream=True):
        pass
    fresh["small"].behaviour = "500"
    client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
    fresh["small"].behaviour = "ok"
    down = Dispatcher(dispatcher_config(fresh, f"127.0.0.1:{free_port()}", log))
    try:
        down.client().chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
    finally:
        down.stop()
    _wait_for_rows(log, 11)
    yield running, log
    running.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_savings_page_in_a_browser_shows_the_numbers_of_the_log(traffic: tuple[Dispatcher, Path],
                                                                trained_artifact: Path, tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    running, log = traffic
    rows = _log_rows(log)
    reasons = {row["reason"] for row in rows}
    # (escalated too, unless the loaded machine made the classifier miss its deadline for that request)
    assert {"classified", "pinned", "capability", "no_text", "fallback"} <= reasons, reasons
    # Another tenant's rows, as a dispatcher with tenants writes them: the page adds them up apart.
    with log.open("a") as file:
        for row in rows[:4]:
            file.write(json.dumps({**row, "tenant": "acme", "prompt_id": row["prompt_id"] + "-acme"}) + "\n")
        # Answered by a tier since renamed (a retrain that renamed it): still shown, in a column of its own.
        file.write(json.dumps({**rows[0], "tenant": "acme", "prompt_id": "renamed", "tier": "xlarge"}) + "\n")
    rows = _log_rows(log)
    prices = {tier.name: (tier.input_usd_per_mtok, tier.output_usd_per_mtok)
              for tier in classifier.load(trained_artifact).manifest.tiers}
    page = f"http://127.0.0.1:{running.port}/promptier/savings"
    cells = Cells()
    cells.feed(chromium(f"{page}#key=operator-key", tmp_path / "profile", "--dump-dom"))
    assert not cells.hidden["report"] and cells.hidden["login"] and cells.hidden["error"]
    groups = {"all": rows, DEFAULT_GROUP: [row for row in rows if row.get("tenant", DEFAULT_GROUP) == DEFAULT_GROUP],
              "acme": [row for row in rows if row.get("tenant") == "acme"]}
    for group, group_rows in groups.items():
        for name, expected in _expected(group_rows, prices["large"]).items():
            value, text = cells.cells[(group, name)]
            assert float(value) == pytest.approx(expected, rel=1e-9, abs=1e-15), (group, name, value, expected)
            if name in ("requests", "fallbacks", "escalations", "errors"):
                assert text == f"{expected:,}", (group, name, text)
    assert cells.cells[("all", "saved_usd")][1].startswith("$")
    for group in ("all", "acme"):  # the renamed tier's request is counted where the page shows tiers
        assert cells.cells[(group, "tier:xlarge")][0] == "1", group
    total = _expected(rows, prices["large"])
    assert total["saved_usd"] > 0 and total["fallbacks"] >= 1
    # A screenshot of the same page: drawn, not blank (the tier colours of the charts are in it).
    shot = tmp_path / "savings.png"
    chromium(f"{page}#key=operator-key", tmp_path / "profile-2", f"--screenshot={shot}")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1800)
    assert max(ImageStat.Stat(image.convert("L")).stddev) > 20
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50
    present = {colour for _, colour in colours}
    assert {(0x4E, 0x79, 0xA7), (0xF2, 0x8E, 0x2B), (0x59, 0xA1, 0x4F)} <= present  # small, medium, large
    # Without the key the page loads but shows no data: it asks for the key.
    refused = Cells()
    refused.feed(chromium(page, tmp_path / "profile-3", "--dump-dom"))
    assert not refused.hidden["login"] and refused.hidden["report"] and not refused.cells
    # A tenant's own key shows that tenant alone, and says so.
    dom = chromium(f"{page}#key=caller-key", tmp_path / "profile-4", "--dump-dom")
    own = Cells()
    own.feed(dom)
    assert not own.hidden["report"] and "Tenant default only" in dom
    assert '<tr class="total"><td>Tenant default</td>' in dom  # its total is its own, not "All tenants"
    assert "<h2>Tiers over time, tenant default</h2>" in dom
    assert {group for group, _ in own.cells} == {"all", DEFAULT_GROUP}
    assert float(own.cells[("all", "requests")][0]) == len(groups[DEFAULT_GROUP])


@pytest.mark.skipif(NODE is None, reason="node is not installed (Debian: apt-get install nodejs)")
def test_the_page_writes_money_with_its_sign_before_the_currency() -> None:
    """Escalations can cost a tenant more than always-top-tier would have: that saving reads -$0.047."""
    page = (Path(savings_page.__file__).parent / "savings.html").read_text()
    start = page.index("function usd(")
    usd = page[start:page.index("\n}\n", start) + 3]
    values = "[-0.047, 0.047, -1234.5, 1234.5, 0, -1e-8, null]"
    shown = subprocess.run([str(NODE), "-e", f"{usd}\nconsole.log(JSON.stringify({values}.map(usd)));"],
                           capture_output=True, text=True, check=True, timeout=60).stdout
    assert json.loads(shown) == ["-$0.04700", "$0.04700", "-$1,234.50", "$1,234.50", "$0", "-$1.000e-8", "unknown"]


def test_savings_data_is_protected_like_the_other_endpoints(traffic: tuple[Dispatcher, Path]) -> None:
    running, log = traffic
    base = f"http://127.0.0.1:{running.port}/promptier"
    assert httpx.get(f"{base}/savings.json").status_code == 401
    assert httpx.get(f"{base}/savings.json", headers={"authorization": "Bearer wrong"}).status_code == 401
    reply = httpx.get(f"{base}/savings.json", headers={"authorization": "Bearer operator-key"})
    assert reply.status_code == 200 and reply.json()["total"]["requests"] == len(_log_rows(log))
    assert "access-control-allow-origin" not in reply.headers
    page = httpx.get(f"{base}/savings")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'sha256-" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and b"operator-key" not in page.content


def test_a_tenants_key_sees_its_own_figures_and_an_operator_key_every_tenants(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPHA_KEYS", "alpha-key")
    monkeypatch.setenv("BETA_KEYS", "beta-key")
    monkeypatch.setenv("OPERATOR_KEYS", "ops-key")
    log = tmp_path / "decisions.jsonl"
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, log, savings_page={
        "operator_keys_env": "OPERATOR_KEYS"}, tenants={
            "alpha": {"api_keys_env": "ALPHA_KEYS", "allowed_tiers": ["small", "medium"]},
            "beta": {"api_keys_env": "BETA_KEYS"}}))
    try:
        for text in (EASY, HARD):
            running.client(api_key="alpha-key").chat.completions.create(
                model="promptier", messages=[{"role": "user", "content": text}])
        running.client(api_key="beta-key").chat.completions.create(
            model="promptier", messages=[{"role": "user", "content": HARD}])
        rows = _wait_for_rows(log, 3)
        url = f"http://127.0.0.1:{running.port}/promptier/savings.json"

        def seen_by(key: str) -> dict:
            reply = httpx.get(url, headers={"authorization": f"Bearer {key}"})
            assert reply.status_code == 200
            return reply.json()

        for key, tenant in (("alpha-key", "alpha"), ("beta-key", "beta")):
            own = seen_by(key)
            mine = [row for row in rows if row["tenant"] == tenant]
            assert own["tenant"] == tenant and [group["tenant"] for group in own["groups"]] == [tenant]
            assert own["total"]["requests"] == own["window"]["rows"] == len(mine)
            assert own["total"]["spend_usd"] == pytest.approx(sum(row["cost_usd"] for row in mine))
            assert own["window"]["files"] == []  # the operator's paths are not a tenant's business
            # Always-top-tier is the tenant's own top tier: alpha may not use large.
            top = "medium" if tenant == "alpha" else "large"
            price = own["prices"][top]
            assert own["top_tier"] == top and own["total"]["top_tier_usd"] == pytest.approx(sum(
                (row["usage"]["prompt_tokens"] * price["input_usd_per_mtok"]
                 + row["usage"]["completion_tokens"] * price["output_usd_per_mtok"]) / 1e6 for row in mine))
        everything = seen_by("ops-key")
        assert everything["tenant"] is None and everything["total"]["requests"] == 3
        assert everything["top_tier"] is None  # alpha's and beta's differ: each group names its own
        if CHROMIUM is not None:  # and the page says so, rather than naming one tier for both
            page = chromium(f"http://127.0.0.1:{running.port}/promptier/savings#key=ops-key", tmp_path / "profile",
                            "--dump-dom")
            assert "Always top tier" in page and "most capable allowed tier (" in page
            assert "alpha: medium" in page and "beta: large" in page
        assert {group["tenant"] for group in everything["groups"]} == {"alpha", "beta"}
        assert everything["window"]["files"] == [str(log)]
        assert httpx.get(url, headers={"authorization": "Bearer nobody"}).status_code == 401
        # /metrics labels every tenant's spend and budget: with operator keys set, it is theirs alone.
        for path in ("/metrics", "/metrics/"):
            metrics = f"http://127.0.0.1:{running.port}{path}"
            for refused in ({}, {"authorization": "Bearer alpha-key"}, {"authorization": "Bearer nobody"}):
                reply = httpx.get(metrics, headers=refused)
                assert reply.status_code == 401 and "tenant_spend" not in reply.text, (path, refused)
            reply = httpx.get(metrics, headers={"authorization": "Bearer ops-key"})
            assert reply.status_code == 200 and 'promptier_dispatch_tenant_spend_usd_total{tenant="beta"}' in reply.text
        # An operator key reads the page and nothing else: it is no key for requests.
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="ops-key").chat.completions.create(
                model="promptier", messages=[{"role": "user", "content": EASY}])
    finally:
        running.stop()


def _tenants(monkeypatch: pytest.MonkeyPatch, **extra: object) -> Tenants:
    monkeypatch.setenv("ALPHA_KEYS", "alpha-key")
    monkeypatch.setenv("LEGACY_KEYS", "legacy-key")
    config = DispatcherConfig.model_validate({
        "tiers": {tier: {"base_url": "http://127.0.0.1:9/v1", "model": tier} for tier in TIERS},
        "fallback_tier": "large", **extra})
    return Tenants(config, CollectorRegistry())


def test_each_key_opens_one_view_whatever_form_its_header_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    keyed = _tenants(monkeypatch, inbound_api_keys_env="LEGACY_KEYS", tenants={"alpha": {"api_keys_env": "ALPHA_KEYS"}})
    access = savings_page.SavingsAccess(keyed, {"ops-key"})
    for header in ("Bearer alpha-key", "bearer alpha-key", "BEARER   alpha-key ", "alpha-key"):
        assert access.view(header) == savings_page.View("alpha"), header
    assert access.view("Bearer legacy-key") == savings_page.View(DEFAULT_GROUP)
    assert access.view("Bearer ops-key") is savings_page.EVERY_TENANT
    for refused in ("", "Bearer", "Bearer alpha", "Basic alpha-key", "Bearer alpha-key2"):
        assert access.view(refused) is None, refused
    assert keyed.authenticate("bearer alpha-key") is keyed.by_name["alpha"]  # requests read keys alike
    open_dispatcher = _tenants(monkeypatch)
    assert savings_page.SavingsAccess(open_dispatcher, None).view("") is savings_page.EVERY_TENANT
    guarded = savings_page.SavingsAccess(open_dispatcher, {"ops-key"})
    assert guarded.view("") is None and guarded.view("Bearer anything") is None
    assert guarded.view("Bearer ops-key") is savings_page.EVERY_TENANT


def test_views_are_cut_from_one_reading_and_a_tenant_learns_nothing_of_the_others(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"

    def row(tenant: str | None, cost: float) -> str:
        fields = {"tier": "small", "reason": "classified", "status": 200, "cost_usd": cost, "usage": None,
                  "classifier_ms": 1.0, "time": "2026-11-29T10:00:00Z"}
        return json.dumps(fields if tenant is None else {**fields, "tenant": tenant}) + "\n"

    path.write_text(row("alpha", 0.5) + row(None, 0.25) + row("beta", 1.0) + row("beta", 1.0) + "not json\n")
    report = savings_page.SavingsReport(path, 0, 1 << 20, TIERS, lambda: {})

    async def views() -> list[dict]:
        return [await report.get(view) for view in (savings_page.View("alpha"), savings_page.EVERY_TENANT,
                                                    savings_page.View(DEFAULT_GROUP),
                                                    savings_page.View("gamma"))]

    alpha, everything, default, gamma = asyncio.run(views())
    assert alpha["tenant"] == "alpha" and alpha["total"]["requests"] == 1 and alpha["total"]["spend_usd"] == 0.5
    assert alpha["window"]["files"] == [] and alpha["window"]["bytes_read"] == 0
    assert alpha["window"]["unreadable_lines"] == 0 and alpha["window"]["rows"] == 1
    assert [group["tenant"] for group in alpha["groups"]] == ["alpha"]
    assert default["total"]["requests"] == 1 and default["total"]["spend_usd"] == 0.25  # rows without a tenant
    assert gamma["tenant"] == "gamma" and gamma["total"]["requests"] == 0 and gamma["groups"] == []
    assert everything["tenant"] is None and everything["total"]["requests"] == 4
    assert everything["window"]["files"] == [str(path)] and everything["window"]["unreadable_lines"] == 1
    with path.open("a") as file:
        file.write(row("alpha", 0.125))
    later = asyncio.run(report.get(savings_page.View("alpha")))  # a new row refreshes every view
    assert later["total"]["requests"] == 2 and later["total"]["spend_usd"] == 0.625


def test_tenant_keys_without_operator_keys_warn_that_metrics_shows_every_tenant(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from serving.dispatch.app import create_app

    monkeypatch.setenv("TEAM_KEYS", "team-key")
    monkeypatch.setenv("OPERATOR_KEYS", "ops-key")
    keyed = dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl",
                              inbound_api_keys_env="TEAM_KEYS")
    create_app(keyed)
    assert '"event": "metrics_open"' in caplog.text and "savings_page.operator_keys_env" in caplog.text
    caplog.clear()
    create_app(keyed.model_copy(update={"savings_page": keyed.savings_page.model_copy(
        update={"operator_keys_env": "OPERATOR_KEYS"})}))
    create_app(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "open.jsonl"))  # open: nothing to keep
    assert "metrics_open" not in caplog.text


def test_operator_keys_alone_guard_the_page_of_a_dispatcher_without_tenant_keys(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPERATOR_KEYS", "ops-key")
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl",
                                           savings_page={"operator_keys_env": "OPERATOR_KEYS"}))
    try:
        running.client().chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
        url = f"http://127.0.0.1:{running.port}/promptier/savings.json"
        assert httpx.get(url).status_code == 401
        reply = httpx.get(url, headers={"authorization": "Bearer ops-key"})
        assert reply.status_code == 200 and reply.json()["total"]["requests"] == 1
    finally:
        running.stop()


def test_savings_page_refuses_a_foreign_host_without_keys_and_can_be_turned_off(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path) -> None:
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl"))
    off = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "other.jsonl",
                                       savings_page={"enabled": False}))
    try:
        url = f"http://127.0.0.1:{running.port}/promptier/savings.json"
        empty = httpx.get(url).json()  # no request yet: an empty log is an empty report
        assert empty["total"]["requests"] == 0 and empty["window"]["rows"] == 0
        running.client().chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
        assert httpx.get(url).json()["total"]["by_tier"] == {"small": 1, "medium": 0, "large": 0}
        for path in ("savings", "savings.json"):
            reply = httpx.get(f"http://127.0.0.1:{running.port}/promptier/{path}", headers={"host": "rebind.example"})
            assert reply.status_code == 403 and reply.json()["error"]["code"] == "host_not_allowed"
            assert httpx.get(f"http://127.0.0.1:{off.port}/promptier/{path}").status_code == 404
    finally:
        running.stop()
        off.stop()


def test_the_window_reads_the_backups_newest_first_within_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(DecisionLogConfig(path=path, max_bytes=4096, backups=3))
    for index in range(200):  # ~100 bytes each: about 5 files' worth, of which 4 are kept
        log.write({"n": index, "time": f"2026-01-01T00:{index // 60:02d}:{index % 60:02d}Z", "tier": "small",
                   "status": 200, "reason": "classified", "cost_usd": 0.001, "padding": "x" * 30})
    log.close()
    with path.open("ab") as file:
        file.write(b'{"n": "half a line being written')  # a line still being appended is left for later
    stream = b"".join(Path(name).read_bytes() for name in (f"{path}.3", f"{path}.2", f"{path}.1", str(path)))
    complete = stream[:stream.rfind(b"\n") + 1]
    everything = read_window(path, 3, 10 << 20)
    assert [row["n"] for row in everything.rows] == [json.loads(line)["n"] for line in complete.splitlines()]
    assert everything.rows[0]["n"] > 0  # the oldest lines went with the rotation
    assert not everything.truncated and everything.files[0] == str(path) and len(everything.files) == 4
    at_a_line = len(stream) - stream.rfind(b"\n", 0, len(stream) - 5000) - 1  # the window starts with a line
    for bound in (5000, 4999, 5001, at_a_line, at_a_line + 1, len(stream) - len(complete) + 300):
        # The newest `bound` bytes: the lines wholly inside them, across the current file and its backups.
        window = stream[-bound:]
        starts_clean = stream[-bound - 1:-bound] == b"\n"
        inside = window[:window.rfind(b"\n") + 1]
        inside = inside if starts_clean else inside[inside.find(b"\n") + 1:]
        bounded = read_window(path, 3, bound)
        assert bounded.truncated and bounded.bytes_read == bound
        assert [row["n"] for row in bounded.rows] == [json.loads(line)["n"] for line in inside.splitlines()], bound
    bounded = read_window(path, 3, 5000)
    report = summarize(bounded, TIERS, {"large": (1.0, 2.0)})
    assert report["total"]["requests"] == len(bounded.rows)
    assert report["total"]["spend_usd"] == pytest.approx(0.001 * len(bounded.rows))
    assert sum(sum(bucket.values()) for bucket in report["total"]["over_time"]) == len(bounded.rows)
    assert report["bucket_s"] == 60 and len(report["buckets"]) <= 48


def test_summary_groups_tenants_and_prices_the_top_tier() -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 100}
    rows = [
        {"tenant": "a", "tier": "small", "reason": "classified", "status": 200, "cost_usd": 0.0003, "usage": usage,
         "classifier_ms": 1.0, "time": "2026-01-01T00:00:00Z"},
        {"tenant": "a", "tier": "large", "reason": "fallback", "status": 200, "cost_usd": 0.0015, "usage": usage,
         "classifier_ms": 20.0, "time": "2026-01-01T00:30:00Z"},
        {"tier": "medium", "reason": "capability", "status": 200, "cost_usd": None, "usage": None,
         "classifier_ms": 3.0, "steered": {"from_tier": "large", "from_reason": "fallback", "by": ["images"]},
         "time": "2026-01-01T02:00:00Z"},
        {"tier": None, "reason": "escalated", "status": 502, "cost_usd": None, "usage": None, "classifier_ms": None,
         "time": "2026-01-01T02:00:01Z"},
    ]
    report = summarize(LogWindow(rows, [], 0, False, 0), TIERS, {"small": (0.2, 0.2), "large": (1.0, 5.0)})
    groups = {group["tenant"]: group for group in report["groups"]}
    assert list(groups) == ["a", DEFAULT_GROUP]
    a = groups["a"]
    assert a["spend_usd"] == pytest.approx(0.0018) and a["top_tier_usd"] == pytest.approx(2 * 0.0015)
    assert a["saved_usd"] == pytest.approx(0.0012) and a["saved_share"] == pytest.approx(0.4)
    assert a["fallbacks"] == 1 and a["classifier_ms"]["p50"] == 1.0 and a["classifier_ms"]["p99"] == 20.0
    default = groups[DEFAULT_GROUP]
    assert default["fallbacks"] == 1 and default["escalations"] == 1 and default["errors"] == 1
    assert default["answered_without_cost"] == 1 and default["spend_usd"] == 0
    assert report["total"]["requests"] == 4 and report["total"]["by_tier"] == {"small": 1, "medium": 1, "large": 1}
    assert report["bucket_s"] == 300 and len(report["buckets"]) == 25
    assert summarize(LogWindow(rows, [], 0, False, 0), TIERS, {})["total"]["top_tier_usd"] is None  # no prices yet
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0 and percentile([], 50) is None


def test_a_restricted_tenants_saving_is_measured_against_its_own_top_tier(tmp_path: Path) -> None:
    """A tenant kept to small and medium would, without the router, call medium: priced at large, its
    saving would count money it could never have spent."""
    usage = {"prompt_tokens": 1000, "completion_tokens": 100}
    rows = [{"tenant": tenant, "tier": "small", "reason": "classified", "status": 200, "cost_usd": 0.00022,
             "usage": usage, "time": "2026-01-01T00:00:00Z"} for tenant in ("a", "b")]
    prices = {"small": (0.2, 0.2), "medium": (0.5, 1.0), "large": (1.0, 5.0)}
    report = summarize(LogWindow(rows, [], 0, False, 0), TIERS, prices, {"a": "medium"})
    groups = {group["tenant"]: group for group in report["groups"]}
    assert groups["a"]["top_tier"] == "medium" and groups["a"]["top_tier_usd"] == pytest.approx(0.0006)
    assert groups["b"]["top_tier"] == "large" and groups["b"]["top_tier_usd"] == pytest.approx(0.0015)
    assert report["top_tier"] is None and report["total"]["top_tier_usd"] == pytest.approx(0.0021)
    assert report["total"]["saved_usd"] == pytest.approx(0.0021 - 0.00044)
    own = summarize(LogWindow(rows[:1], [], 0, False, 0), TIERS, prices, {"a": "medium"})  # a's key's view
    assert own["top_tier"] == "medium" and own["total"]["saved_share"] == pytest.approx(1 - 0.00022 / 0.0006)
    # Until medium's price is known, a's saving is unknown, not priced at another tier.
    unpriced = summarize(LogWindow(rows, [], 0, False, 0), TIERS, {"small": (0.2, 0.2), "large": (1.0, 5.0)},
                         {"a": "medium"})
    assert unpriced["total"]["top_tier_usd"] is None
    # A's key before a's first request: nothing yet, against medium all the same, not the last tier.
    empty = LogWindow([], [], 0, False, 0)
    assert summarize(empty, TIERS, prices, {"a": "medium"}, tenant="a")["top_tier"] == "medium"
    served = savings_page.SavingsReport(tmp_path / "decisions.jsonl", 0, 1 << 20, TIERS, lambda: prices,
                                        {"a": "medium"})
    seen = asyncio.run(served.get(savings_page.View("a")))
    assert seen["tenant"] == "a" and seen["top_tier"] == "medium" and seen["total"]["requests"] == 0
    assert asyncio.run(served.get(savings_page.View("b")))["top_tier"] == "large"


def test_refused_requests_are_not_in_the_log_nor_on_the_page(traffic: tuple[Dispatcher, Path]) -> None:
    running, log = traffic
    with pytest.raises(openai.BadRequestError):  # refused before routing: not in the log
        running.client(api_key="caller-key").chat.completions.create(
            model="promptier/tier/small", messages=user_with_parts(EASY, IMAGE))
    reply = httpx.get(f"http://127.0.0.1:{running.port}/promptier/savings.json",
                      headers={"authorization": "Bearer operator-key"})
    assert reply.json()["total"]["requests"] == len(_log_rows(log)) == 11


def test_reported_outcomes_in_the_log_are_not_counted_as_requests(tmp_path: Path) -> None:
    from serving.dispatch.decision_log import OutcomeRecord

    path = tmp_path / "decisions.jsonl"
    request = {"schema_version": 5, "prompt_id": "dispatcher:" + "a" * 32, "tier": "small", "routed_tier": "small",
               "reason": "classified", "status": 200, "cost_usd": 0.001, "time": "2026-11-29T10:00:00Z"}
    outcome = OutcomeRecord(prompt_id=request["prompt_id"], score=1.0, judge=None, time="2026-11-29T10:01:00Z")
    path.write_text(json.dumps(request) + "\n" + json.dumps(outcome.as_dict()) + "\n")
    assert [row["prompt_id"] for row in read_window(path, 0, 1 << 20).rows] == [request["prompt_id"]]


def test_a_number_json_reads_as_infinite_or_too_large_counts_as_missing(tmp_path: Path) -> None:
    """`1e999` reads as infinity, `NaN` as not-a-number, and a 400-digit integer has no float: one such line
    in the log must leave the page answering (its JSON has no word for infinity), with that figure missing."""
    path = tmp_path / "decisions.jsonl"
    good = {"tenant": "a", "tier": "small", "reason": "classified", "status": 200, "cost_usd": 0.001,
            "usage": {"prompt_tokens": 1000, "completion_tokens": 100}, "classifier_ms": 1.0,
            "time": "2026-01-01T00:00:00Z"}
    bad = json.dumps(good)
    lines = [bad, bad.replace('"cost_usd": 0.001', '"cost_usd": 1e999'),
             bad.replace('"cost_usd": 0.001', '"cost_usd": NaN').replace('"classifier_ms": 1.0',
                                                                          '"classifier_ms": NaN'),
             bad.replace('"cost_usd": 0.001', '"cost_usd": 1' + "0" * 400),
             bad.replace('"prompt_tokens": 1000', '"prompt_tokens": 1e999')]
    path.write_text("\n".join(lines) + "\n")
    served = savings_page.SavingsReport(path, 0, 1 << 20, TIERS, lambda: {"small": (0.2, 0.2), "large": (1.0, 5.0)})
    report = asyncio.run(served.get())
    json.dumps(report, allow_nan=False)  # what the page's answer must be
    total = report["total"]
    assert total["requests"] == 5 and total["spend_usd"] == pytest.approx(0.002)
    assert total["answered_without_cost"] == 3  # the rows whose cost was no number
    assert total["top_tier_usd"] == pytest.approx(0.0015)  # the row whose tokens were no number is not priced
    assert total["classifier_ms"]["p99"] == 1.0


def test_the_chart_has_at_most_its_bucket_count_wherever_the_first_row_falls() -> None:
    """Two rows 2,879 s apart fit 48 one-minute buckets, but not when the first bucket starts at the
    minute before a first row at :30."""
    rows = [{"tier": "small", "reason": "classified", "status": 200, "time": "2026-01-01T00:00:30Z"},
            {"tier": "small", "reason": "classified", "status": 200, "time": "2026-01-01T00:48:29Z"}]
    report = summarize(LogWindow(rows, [], 0, False, 0), TIERS, {})
    assert len(report["buckets"]) <= 48 and report["bucket_s"] == 300
    assert report["total"]["requests"] == 2
