"""Budget pacing (serving.dispatch.budget_pacing) and its simulation (`promptier budget-sim`)."""

from __future__ import annotations

import calendar
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from classifier.artifact import load_manifest
from classifier.policy import choose_tiers
from classifier.runtime import DEFAULT_MODEL_DIR
from serving.dispatch.budget_pacing import (
    EXHAUSTED,
    PACED,
    BudgetRule,
    budget_pressure,
    decide,
    paced_tier,
    window_of,
)
from serving.dispatch.decision_log import DecisionRecord

MANIFEST = load_manifest(DEFAULT_MODEL_DIR)
TIERS = [tier.name for tier in MANIFEST.tiers]
PRICES = [(tier.input_usd_per_mtok, tier.output_usd_per_mtok) for tier in MANIFEST.tiers]
# A balanced threshold of the shipped kind (ratio rule), fixed so that the synthetic traffic, and with it
# the tier mix the pacing tests rely on, does not move each time the default model is retrained. The
# simulator reads only the tiers and prices of the model.
SYNTHETIC_THRESHOLD = 0.4772


def _utc(*fields: int) -> float:
    return float(calendar.timegm((*fields, 0, 0, 0)[:6]))


def test_periods_are_calendar_aligned_in_utc() -> None:
    leap = window_of("month", _utc(2024, 2, 29, 23, 59, 59))
    assert (leap.key, leap.start, leap.end) == ("2024-02", _utc(2024, 2, 1), _utc(2024, 3, 1))
    december = window_of("month", _utc(2025, 12, 31, 12))
    assert (december.key, december.end) == ("2025-12", _utc(2026, 1, 1))
    day = window_of("day", _utc(2025, 6, 14, 18))
    assert (day.key, day.start, day.end) == ("2025-06-14", _utc(2025, 6, 14), _utc(2025, 6, 15))
    assert day.elapsed(_utc(2025, 6, 14, 18)) == pytest.approx(0.75)
    assert window_of("day", day.end).key == "2025-06-15"  # the end belongs to the next period


def test_pressure_rises_continuously_from_the_even_line_to_full_at_the_band() -> None:
    budget, band = 100.0, 0.1
    assert budget_pressure(30.0, budget, 0.5, band) == 0.0  # under the line
    assert budget_pressure(50.0, budget, 0.5, band) == 0.0  # on it
    # Half the band ahead of what the rest of the period allows: half pressure; the whole band: full.
    assert budget_pressure(52.5, budget, 0.5, band) == pytest.approx(0.5)
    assert budget_pressure(55.0, budget, 0.5, band) == pytest.approx(1.0)
    spends = np.linspace(50.0, 56.0, 61)
    pressures = [budget_pressure(float(s), budget, 0.5, band) for s in spends]
    assert all(b >= a for a, b in itertools.pairwise(pressures))  # monotone
    assert max(abs(b - a) for a, b in itertools.pairwise(pressures)) < 0.05  # no jump
    # The same lead late in the period weighs more: the band shrinks with the time left.
    assert budget_pressure(91.0, budget, 0.9, band) == 1.0 > budget_pressure(51.0, budget, 0.5, band)
    assert budget_pressure(100.0, budget, 0.2, band) == 1.0 and budget_pressure(10.0, budget, 1.0, band) == 1.0


def test_a_paced_request_goes_where_the_saving_is_large_and_the_loss_within_the_floor() -> None:
    costs_of = {"short": 10.0, "long": 8000.0}
    from serving.dispatch.budget_pacing import estimated_costs, reference_cost

    reference = reference_cost(PRICES)
    probabilities = [0.55, 0.70, 0.80]
    allowed = [0, 1, 2]

    def paced(prompt: str, pressure: float, chosen: int = 2, floor: float = 1.0, p: list[float] = probabilities,
              tiers: list[int] = allowed) -> int:
        return paced_tier(p, chosen, tiers, estimated_costs(PRICES, costs_of[prompt]), reference, pressure * 4.0,
                          floor)

    assert paced("short", 0.0) == 2  # no pressure, no move
    assert paced("short", 1.0) == 0  # full pressure: the cheapest tier, not the next one down
    assert paced("long", 0.3) == 0  # a long prompt saves more: it moves at lower pressure
    assert paced("short", 0.3) == 2
    assert paced("short", 1.0, floor=0.2) == 1  # the floor: small would give up 0.25, medium 0.10
    assert paced("short", 1.0, floor=0.05) == 2
    assert paced("short", 1.0, tiers=[1, 2]) == 1  # only allowed tiers
    # Medium to small saves a few cents: not worth a downgrade, even at full pressure.
    assert paced("short", 1.0, chosen=1) == 1


def test_decide_stops_at_exhaustion_as_configured_and_leaves_unscored_requests_alone() -> None:
    scores = (0.55, 0.70, 0.80)
    cheapest = BudgetRule(usd=10.0, max_quality_loss=1.0)
    reject = BudgetRule(usd=10.0, on_exhausted="reject")
    spent = decide(cheapest, 10.0, 0.5, 2, scores, [0, 1, 2], PRICES, 100)
    assert (spent.tier, spent.reason, spent.reject) == (0, EXHAUSTED, False)
    assert decide(cheapest, 10.0, 0.5, 2, scores, [1, 2], PRICES, 100).tier == 1  # its cheapest allowed tier
    refused = decide(reject, 12.0, 0.5, 2, scores, [0, 1, 2], PRICES, 100)
    assert refused.reject and refused.reason == EXHAUSTED
    ahead = decide(cheapest, 9.0, 0.5, 2, scores, [0, 1, 2], PRICES, 100)
    assert (ahead.tier, ahead.reason, ahead.pressure) == (0, PACED, 1.0)
    # Pinned, fallback or prior-decided requests have no scores: not paced, however far ahead.
    assert decide(cheapest, 9.0, 0.5, 2, None, [0, 1, 2], PRICES, 100).tier == 2
    # Without prices (the classifier not reached yet) nothing can be weighed: not paced either.
    assert decide(cheapest, 9.0, 0.5, 2, scores, [0, 1, 2], [], 100).tier == 2
    hard = BudgetRule(usd=10.0, pacing=False)
    assert decide(hard, 9.9, 0.5, 2, scores, [0, 1, 2], PRICES, 100).tier == 2  # a hard cap waits for the end


def synthetic_decision_log(path: Path, requests: int, difficulty: float, seed: int) -> dict[str, float]:
    """A month of traffic as the dispatcher would log it: prompts of varied difficulty (`difficulty`
    shifts the mix of tiers), per-tier probabilities from a latent-ability model, the tier a balanced
    policy like the shipped model's picks, and log-normal prompt and answer lengths. Returns the tier mix."""
    rng = np.random.default_rng(seed)
    hardness = rng.normal(difficulty, 1.0, requests)
    ability = np.array([-0.9, 0.0, 0.7])  # small, medium, large
    noise = rng.normal(0, 0.5, (requests, 3))
    probabilities = 1 / (1 + np.exp(-(2.0 * (ability[None, :] - hardness[:, None]) + noise)))
    chosen = choose_tiers(probabilities, SYNTHETIC_THRESHOLD, np.ones(3, bool), "ratio")
    prompt_tokens = np.exp(rng.normal(math.log(300), 1.0, requests)).round()
    answer_tokens = np.exp(rng.normal(math.log(250), 0.8, requests)).round()
    start = _utc(2025, 6, 1)
    with path.open("w") as handle:
        for index in range(requests):
            tier = TIERS[chosen[index]]
            usage = {"prompt_tokens": int(prompt_tokens[index]), "completion_tokens": int(answer_tokens[index])}
            row = DecisionRecord(
                prompt_id=f"dispatcher:{index}", prompt=None, messages=None, model=f"{tier}-model", score=None,
                cost_usd=None, source="dispatcher", category="", tier=tier, routed_tier=tier, reason="classified",
                mode="balanced", confidence=float(probabilities[index, chosen[index]]), decided_by="model",
                classifier_ms=1.0, latency_ms=100.0, usage=usage, status=200, note=None,
                time=_iso(start + index * 30 * 86400 / requests), tenant="search",
                scores=dict(zip(TIERS, probabilities[index].tolist(), strict=True)))
            handle.write(json.dumps(row.as_dict()) + "\n")
    return dict(zip(TIERS, (np.bincount(chosen, minlength=3) / requests).tolist(), strict=True))


def _iso(epoch: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _budget_sim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "classifier.cli", "budget-sim", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize(("difficulty", "seed"), [(-1.4, 11), (-0.8, 12), (-0.4, 13)])
def test_pacing_meets_half_the_unpaced_spend_with_fewer_downgrades_than_a_hard_cap(
        tmp_path: Path, difficulty: float, seed: int) -> None:
    """The bar: a budget of half the unpaced spend, met within 5% by pacing, with fewer requests served
    below the policy's tier than a hard cap at the same budget (which then serves the cheapest tier)."""
    log = tmp_path / "decisions.jsonl"
    mix = synthetic_decision_log(log, 4000, difficulty, seed)
    assert min(mix.values()) > 0.05 and mix["large"] < 0.7, mix  # a mix of tiers, not one
    out = tmp_path / "sim.json"
    # The settings a tenant gets by default (quality floor 0.5, band 0.1).
    result = _budget_sim(str(log), "--budget-share", "0.5", "--tenant", "search", "--arrival", "logged",
                         "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    policies = report["policies"]
    assert report["requests"] == 4000 and report["budget_share_of_unpaced"] == pytest.approx(0.5)
    assert policies["unpaced"]["spend_vs_budget"] == pytest.approx(2.0)
    paced, hard = policies["paced"], policies["hard cap"]
    assert abs(paced["spend_vs_budget"] - 1.0) <= 0.05, paced
    assert paced["downgrades"] < hard["downgrades"], (paced, hard)
    assert paced["mean_p_good"] > hard["mean_p_good"]  # and the answers are better on the way
    assert hard["spend_vs_budget"] > 1.0  # the cap serves the cheapest tier once spent: it overshoots
    # The paced curve tracks the budget line: never more than the band's worth above it.
    for elapsed, spend in zip(report["curve"]["elapsed"], report["curve"]["paced"], strict=True):
        assert spend / report["budget_usd"] <= elapsed + 0.1 + 0.01, elapsed
    assert "| paced |" in result.stdout and "| hard cap |" in result.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot: matplotlib is not installed" in result.stdout
    else:
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_sim_replays_labeled_logs_and_refuses_what_it_cannot_replay(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    texts = ["hi", "Prove that there are infinitely many primes.", "What is the capital of France?",
             "Write a Python function that merges two sorted lists, with tests.",
             "Explain the CAP theorem with an example of each trade-off."] * 8
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": text, "completion_tokens": 200 + i,
                                           "prompt_tokens": len(text) // 4 + 1}) + "\n"
                               for i, text in enumerate(texts)))
    labeled = tmp_path / "labeled.jsonl"
    label = subprocess.run([sys.executable, "-m", "classifier.cli", "label", str(prompts), "-o", str(labeled),
                            "--keep", "prompt_tokens", "--keep", "completion_tokens", "--workers", "1"],
                           capture_output=True, text=True, timeout=300)
    assert label.returncode == 0, label.stderr
    out = tmp_path / "sim.json"
    result = _budget_sim(str(labeled), "--budget-usd", "0.0001", "--out", str(out), "--png", str(tmp_path / "p.png"))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["requests"] == len(texts) and report["budget_usd"] == 0.0001
    # Kept token counts (strings in a labeled log) are what each request costs.
    assert report["policies"]["unpaced"]["spend_usd"] > 0.0001
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"tier": "nope", "scores": {}}\n')
    failed = _budget_sim(str(broken), "--out", str(tmp_path / "x.json"))
    assert failed.returncode == 2 and "no replayable request" in failed.stderr and "tier not among" in failed.stderr
    folder = _budget_sim(str(tmp_path), "--out", str(tmp_path / "d.json"))  # named as `label` names it
    assert folder.returncode == 2 and "is a directory; name its files, or a glob" in folder.stderr, folder.stderr
    globbed = _budget_sim(str(tmp_path / "label*.jsonl"), "--budget-usd", "0.0001", "--out", str(tmp_path / "g.json"))
    assert globbed.returncode == 0 and json.loads((tmp_path / "g.json").read_text())["requests"] == len(texts)
    for option in ("--budget-usd", "--budget-share", "--max-quality-loss"):  # a usage error, not a traceback
        zero = _budget_sim(str(labeled), option, "0", "--out", str(tmp_path / "z.json"))
        assert zero.returncode == 2 and "must be greater than 0" in zero.stderr and "Traceback" not in zero.stderr


def test_budget_sim_takes_a_tenants_budget_from_a_dispatcher_config_without_its_keys(tmp_path: Path) -> None:
    """An offline replay reads the tenant's settings from the config the dispatcher runs; the keys the
    config names live in the dispatcher's environment, not the analyst's, and a replay sends nothing."""
    import os
    import shutil

    import yaml

    import serving.dispatch
    from serving.dispatch.dispatch_config import DispatcherConfig, read_config

    config = tmp_path / "dispatcher.yaml"
    shutil.copy(Path(serving.dispatch.__file__).parent / "dispatcher.example.yaml", config)
    example = read_config(config, DispatcherConfig)
    budgeted = next(name for name, tenant in example.tenants.items() if tenant.budget is not None)
    unbudgeted = next(name for name, tenant in example.tenants.items() if tenant.budget is None)
    log = tmp_path / "decisions.jsonl"
    synthetic_decision_log(log, 400, -0.8, 12)
    log.write_text(log.read_text().replace('"tenant": "search"', json.dumps({"tenant": budgeted})[1:-1]))
    # Every variable the config names (upstream and inbound keys) is unset for the replay.
    raw = yaml.safe_load(config.read_text())
    named = {value for section in (raw["tiers"].values(), raw["tenants"].values()) for entry in section
             for key, value in entry.items() if key.endswith("_env")} | {raw["inbound_api_keys_env"]}
    assert "LARGE_API_KEY" in named
    environment = {name: value for name, value in os.environ.items() if name not in named}
    out = tmp_path / "sim.json"
    result = subprocess.run([sys.executable, "-m", "classifier.cli", "budget-sim", str(log), "--config", str(config),
                             "--tenant", budgeted, "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr
    budget = example.tenants[budgeted].budget
    assert budget is not None and json.loads(out.read_text())["budget_usd"] == budget.usd
    assert budget.period == "month" and "warning" not in json.loads(out.read_text())  # a month of rows
    # Three months of rows against a month's budget: replayed as one period, and said so.
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    quarter = tmp_path / "quarter.jsonl"
    quarter.write_text("".join(json.dumps({**row, "time": _iso(_utc(2025, 6, 1) + index * 90 * 86400 / len(rows))})
                               + "\n" for index, row in enumerate(rows)))
    spread = subprocess.run([sys.executable, "-m", "classifier.cli", "budget-sim", str(quarter), "--config",
                             str(config), "--tenant", budgeted, "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=environment)
    assert spread.returncode == 0, spread.stderr
    assert "logged over 89.8 days and are replayed as one month's budget period" in spread.stderr
    assert json.loads(out.read_text())["logged_span_days"] == pytest.approx(90 * 399 / 400)
    # A gRPC classifier's model is not known offline: the shipped model's prices, and the replay says so.
    assert "tiers and prices are the shipped model's; give --model" in result.stderr
    # An embedded one is: the replay charges what that dispatcher charges, its model's prices.
    dearer = tmp_path / "dearer-model"
    shutil.copytree(DEFAULT_MODEL_DIR, dearer)
    manifest = json.loads((dearer / "manifest.json").read_text())
    for tier in manifest["tiers"]:
        tier["input_usd_per_mtok"], tier["output_usd_per_mtok"] = 3 * tier["input_usd_per_mtok"], 7.5
    (dearer / "manifest.json").write_text(json.dumps(manifest))
    raw["classifier"] = {"embedded": True, "model": str(dearer)}
    config.write_text(yaml.safe_dump(raw))
    embedded = subprocess.run([sys.executable, "-m", "classifier.cli", "budget-sim", str(log), "--config",
                               str(config), "--tenant", budgeted, "--out", str(out)],
                              capture_output=True, text=True, timeout=300, env=environment)
    assert embedded.returncode == 0, embedded.stderr
    assert json.loads(out.read_text())["tier_prices_usd_per_mtok"] == [
        [tier.input_usd_per_mtok, tier.output_usd_per_mtok] for tier in load_manifest(dearer).tiers]
    assert load_manifest(dearer).tiers[0].output_usd_per_mtok == 7.5 and "shipped model" not in embedded.stderr
    refused = subprocess.run([sys.executable, "-m", "classifier.cli", "budget-sim", str(log), "--config", str(config),
                              "--tenant", unbudgeted, "--out", str(out)],
                             capture_output=True, text=True, timeout=300, env=environment)
    assert refused.returncode == 2 and "--tenant must name a tenant with a budget" in refused.stderr


def test_budget_sim_replays_requests_a_spent_budget_refused(tmp_path: Path) -> None:
    """A 429 for a spent budget is a request all the same: left out, the replay would understate demand."""
    log = tmp_path / "decisions.jsonl"
    synthetic_decision_log(log, 200, -0.8, 3)
    answered = [json.loads(line) for line in log.read_text().splitlines()]
    refused = [{**row, "prompt_id": f"{row['prompt_id']}-refused", "status": 429, "tier": None,
                "reason": "budget_exhausted", "usage": None, "cost_usd": None} for row in answered[:10]]
    other = {**answered[0], "prompt_id": "gone", "status": 499, "tier": None}  # a caller gone: not replayed
    # A caller gone, or a stream broken, after the upstream had the request: the live budget charged what
    # the line's usage says, so the replay spends it too.
    charged = [{**answered[0], "prompt_id": f"charged-{status}", "status": status} for status in (499, 599)]
    with log.open("a") as file:
        file.writelines(json.dumps(row) + "\n" for row in [*refused, other, *charged])
    out = tmp_path / "sim.json"
    result = _budget_sim(str(log), "--budget-share", "0.5", "--tenant", "search", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["requests"] == 212 and sum(report["skipped"].values()) == 1


def test_budget_sim_replays_in_logged_order_sizes_refusals_like_answers_and_takes_the_policys_tier(
        tmp_path: Path) -> None:
    """A shell lists rotated logs as decisions.jsonl, .1, .10, .2: the replay follows the lines' times. A
    request a spent budget refused has no usage: it is sized like the answered ones, not by the defaults.
    An explored request is replayed on the tier the policy chose, not the one the random draw did."""
    from serving.dispatch import budget_sim
    from serving.dispatch.budget_sim import read_requests

    tiers, prices = ["small", "medium", "large"], [(0.2, 0.2), (0.9, 0.9), (1.25, 5.0)]

    def line(minute: int, **fields: object) -> str:
        row = {"schema_version": 8, "tenant": "default", "status": 200, "reason": "classified", "tier": "small",
               "routed_tier": "small", "unpaced_tier": None, "decided_by": "model", "explored": False,
               "scores": {"small": 0.9, "medium": 0.95, "large": 0.97}, "threshold": 0.4, "cheap_floor": None,
               "usage": {"prompt_tokens": 100 + minute, "completion_tokens": 10},
               "time": f"2026-12-01T10:{minute:02d}:00Z"}
        return json.dumps({**row, **fields}) + "\n"

    (tmp_path / "decisions.jsonl.2").write_text(line(0) + line(1))  # the oldest backup
    (tmp_path / "decisions.jsonl.10").write_text("")
    (tmp_path / "decisions.jsonl.1").write_text(line(2) + line(3, tier="large", routed_tier="large", explored=True,
                                                                 reason="explored"))
    (tmp_path / "decisions.jsonl").write_text(  # a refusal on a tier the model lacks is skipped, sized by nothing
        line(4, status=429, reason="budget_exhausted", tier=None, usage=None)
        + line(4, status=429, reason="budget_exhausted", tier=None, usage=None, routed_tier="huge")
        + line(5, usage={"prompt_tokens": 7, "completion_tokens": 10}))
    shell_order = sorted(tmp_path.iterdir())
    replay = read_requests(shell_order, tiers, prices, (500, 300))
    mean = (100 + 101 + 102 + 103 + 7) / 5
    assert [request.prompt_tokens for request in replay.requests] == [100, 101, 102, 103, mean, 7]
    assert [tiers[request.chosen] for request in replay.requests] == ["small"] * 6  # the explored one too
    refused = replay.requests[-2]
    assert refused.costs[0] == pytest.approx((mean * 0.2 + 10 * 0.2) / 1e6)
    assert replay.skipped == {"tier not among the model's tiers": 1}
    # A tenant allowed small and medium: its policy weighs small against medium, not against large.
    explored = line(0, tier="medium", routed_tier="medium", explored=True, reason="explored", threshold=0.45,
                    scores={"small": 0.5, "medium": 0.6, "large": 0.95})
    (tmp_path / "restricted.jsonl").write_text(explored)
    for allowed, policy in ((None, "large"), (["small", "medium"], "small")):
        report = budget_sim.main([tmp_path / "restricted.jsonl"], tmp_path / "sim.json", None, allowed_tiers=allowed)
        assert report["tiers"] == tiers
        assert {tier for tier, n in report["policies"]["unpaced"]["by_tier"].items() if n} == {policy}


@pytest.mark.parametrize(("amount", "shown"), [
    (4.1666e-06, "$0.00000417"), (0.0042, "$0.00420"), (0.0, "$0.0000"), (12.5, "$12.5000"), (1234.5, "$1,234.5000")])
def test_budget_sim_shows_the_millionths_a_few_requests_cost(amount: float, shown: str) -> None:
    """A fresh decision log's handful of requests costs millionths of a dollar: not `$0.0000` for every policy."""
    from serving.dispatch.budget_sim import usd

    assert usd(amount) == shown
