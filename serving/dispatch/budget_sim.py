"""`promptier budget-sim`: replay logged requests against a budget, with and without pacing.

Each request of a decision log (`promptier dispatch`) or of a labeled log (`promptier label`) is
replayed over one budget period, in order, under three policies, all through
`serving.dispatch.budget_pacing.decide`, the function the live dispatcher calls:

- unpaced: the tier the policy chose (what the log says), no budget;
- hard cap: that tier until the budget is spent, then the cheapest tier (or a refusal);
- paced: the dispatcher's pacing.

A request costs, on each tier, its token counts (the logged usage; for a row without usage,
`--prompt-tokens`/`--completion-tokens`) at that tier's prices, from the model artifact's manifest, where
the dispatcher takes them from too. Counting the same tokens on every tier is an approximation: models
answer at different lengths. Pacing needs the per-tier probabilities the classifier returned
(decision-log `scores`, schema version 4, or a labeled row's `scores`); a row without them keeps its
tier, as in the dispatcher. The replay reads spend exactly, where a dispatcher process reads it up to
`spend_store.refresh_ms` late.

Prints a table, writes JSON and, with matplotlib installed, a PNG of spend over the period.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from classifier.artifact import Rule
from classifier.errors import PromptierError
from classifier.policy import choose_tier
from serving.dispatch.budget_pacing import BudgetRule, OnExhausted, Period, decide
from serving.dispatch.decision_log import BROKEN_STREAM, CLIENT_CLOSED, OUTCOME_KIND

CURVE_POINTS = 100  # spend is sampled at this many evenly spaced moments of the period


class SimulationError(PromptierError):
    """The simulation cannot run on these inputs."""


@dataclass(frozen=True)
class Request:
    at: float  # when it arrives, as a fraction of the period in [0, 1)
    chosen: int  # the tier the unpaced policy chose
    probabilities: tuple[float, ...] | None  # per tier, when the classifier's model decided
    costs: tuple[float, ...]  # USD on each tier
    prompt_tokens: float  # what pacing sizes the request by (the dispatcher: characters / 4)


@dataclass
class Outcome:
    """What one policy did over the period."""

    name: str
    spend_usd: float = 0.0
    served: int = 0
    refused: int = 0
    downgrades: int = 0  # served below the tier the unpaced policy chose
    expected_good: float = 0.0  # sum of the served tier's probability of a good answer (scored requests)
    scored: int = 0
    by_tier: dict[str, int] = field(default_factory=dict)
    curve: list[float] = field(default_factory=list)  # spend at each of CURVE_POINTS moments

    def summary(self, budget: float) -> dict:
        row = {key: value for key, value in asdict(self).items() if key != "curve"}
        row["spend_vs_budget"] = self.spend_usd / budget if budget > 0 else None
        row["mean_p_good"] = self.expected_good / self.scored if self.scored else None
        return row


def simulate(requests: Sequence[Request], tiers: Sequence[str], rule: BudgetRule | None, allowed: Sequence[int],
             prices: Sequence[tuple[float, float]], name: str) -> Outcome:
    """Replay `requests` (sorted by arrival) under `rule` (None: no budget)."""
    outcome = Outcome(name, by_tier=dict.fromkeys(tiers, 0))
    point = 0
    for request in requests:
        while point < CURVE_POINTS and (point + 1) / CURVE_POINTS <= request.at:
            outcome.curve.append(outcome.spend_usd)
            point += 1
        tier = request.chosen
        if rule is not None:
            decision = decide(rule, outcome.spend_usd, request.at, request.chosen, request.probabilities, allowed,
                              prices, request.prompt_tokens)
            if decision.reject:
                outcome.refused += 1
                if request.probabilities is not None:
                    outcome.scored += 1  # a refusal is no good answer
                continue
            tier = decision.tier
        outcome.served += 1
        outcome.by_tier[tiers[tier]] += 1
        outcome.downgrades += tier < request.chosen
        outcome.spend_usd += request.costs[tier]
        if request.probabilities is not None:
            outcome.scored += 1
            outcome.expected_good += request.probabilities[tier]
    outcome.curve += [outcome.spend_usd] * (CURVE_POINTS - len(outcome.curve))
    return outcome


def _rows(path: Path) -> Iterator[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as error:
                    raise SimulationError(f"{path}:{number}: not a JSON line: {error}") from None
                if isinstance(row, dict):
                    yield row


def _json_field(value: object) -> object:
    """A labeled log keeps columns as strings: a JSON object in one is read back."""
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _count(value: object) -> float | None:
    """A token count, also from a labeled log's string column ("18"); None if it is not one."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e9:
        return float(value)
    return None


def _tokens(row: dict, default: tuple[int, int]) -> tuple[float, float]:
    """(prompt, completion) tokens: the row's usage, or its prompt_tokens/completion_tokens, else `default`."""
    usage = _json_field(row.get("usage"))
    source = usage if isinstance(usage, dict) else row
    prompt, completion = _count(source.get("prompt_tokens")), _count(source.get("completion_tokens"))
    if prompt is None or completion is None:
        return float(default[0]), float(default[1])
    return prompt, completion


@dataclass
class Replay:
    requests: list[Request]
    skipped: dict[str, int]
    span_s: float | None = None  # from the first logged `time` to the last; None when a row has none


def _policy_tier(row: dict, tiers: Sequence[str], rule: Rule, allowed: Sequence[int] | None) -> str | None:
    """The tier the policy chose for an explored request (the draw may have sent it elsewhere), from the
    scores, threshold and cheap floor its line records, among the `allowed` tiers (the tenant's, which
    the line does not record; None: all); None when it records no scores."""
    scores, threshold = _json_field(row.get("scores")), row.get("threshold")
    if not isinstance(scores, dict) or not isinstance(threshold, int | float) or not all(
            isinstance(scores.get(name), int | float) for name in tiers):
        return None
    floor = row.get("cheap_floor")
    mask = None if allowed is None else [index in allowed for index in range(len(tiers))]
    return tiers[choose_tier([float(scores[name]) for name in tiers], float(threshold), mask, rule=rule,
                             cheap_floor=float(floor) if isinstance(floor, int | float) else None)]


def read_requests(paths: Sequence[Path], tiers: Sequence[str], tier_prices: Sequence[tuple[float, float]],
                  default_tokens: tuple[int, int], arrival: str = "uniform", tenant: str | None = None,
                  rule: Rule = "ratio", allowed: Sequence[int] | None = None) -> Replay:
    """The replayable requests of decision logs or labeled logs, placed over one period.

    Args:
        arrival: `uniform`: evenly spaced in the order they were logged (by `time` where every row has
            one, as decision lines do, so that a shell's order of rotated files does not matter; else in
            file order); `logged`: by their logged `time`, the log's first to last request stretched
            over the period.
        tenant: decision logs only: that tenant's requests.
        rule: the model's policy rule, which gives an explored request's policy tier from its scores.
        allowed: the tenant's allowed tiers (indices), among which that policy tier is chosen; None: all.
    """
    skipped: dict[str, int] = {}
    # (time, policy tier, probabilities, prompt tokens, completion tokens) per replayable request
    kept: list[tuple[str | None, int, tuple[float, ...] | None, float, float]] = []
    without_usage: set[int] = set()  # refused requests, which have no usage: sized like those answered

    def skip(why: str) -> None:
        skipped[why] = skipped.get(why, 0) + 1

    for path in paths:
        for row in _rows(path):
            if row.get("kind") == OUTCOME_KIND:  # a score reported later, not a request
                continue
            logged = "schema_version" in row or "routed_tier" in row
            refused_by_budget = False
            if logged:
                if tenant is not None and row.get("tenant", "default") != tenant:
                    skip("another tenant")
                    continue
                status = row.get("status")
                # A request its spent budget refused is demand all the same: the replay asks what the
                # budget would have made of it (having no usage, it is sized like the answered ones).
                refused_by_budget = status == 429 and row.get("reason") == "budget_exhausted"
                # A caller gone (499) or a stream broken (599) after the upstream had the request was charged
                # for what it used, logged as its usage: spend the live budget counted, so replayed too.
                charged_unfinished = status in (CLIENT_CLOSED, BROKEN_STREAM) and row.get("tier") is not None \
                    and isinstance(_json_field(row.get("usage")), dict)
                if not (refused_by_budget or charged_unfinished) and (
                        not isinstance(status, int) or not 200 <= status < 400 or row.get("tier") is None):
                    skip("not answered (error, other refusal or caller gone)")
                    continue
                chosen_name = row.get("unpaced_tier") or row.get("routed_tier")
                if row.get("explored"):
                    chosen_name = _policy_tier(row, tiers, rule, allowed)
                    if chosen_name is None:
                        skip("explored, with no scores to give the policy's tier")
                        continue
            else:
                if row.get("error"):
                    skip("not labeled (error)")
                    continue
                chosen_name = row.get("tier")
            if chosen_name not in tiers:
                skip("tier not among the model's tiers")
                continue
            scores = _json_field(row.get("scores"))
            probabilities = None
            if isinstance(scores, dict) and row.get("decided_by", "model") == "model" and all(
                    isinstance(scores.get(name), int | float) for name in tiers):
                probabilities = tuple(float(scores[name]) for name in tiers)
            prompt, completion = _tokens(row, default_tokens)
            if refused_by_budget:
                without_usage.add(len(kept))
            kept.append((row.get("time") if isinstance(row.get("time"), str) else None, tiers.index(chosen_name),
                         probabilities, prompt, completion))
    if not kept:
        raise SimulationError(f"no replayable request in {[str(p) for p in paths]} (skipped: {skipped or 'none'})")
    if without_usage:
        kept = _sized_like_the_answered(kept, without_usage)
    # Each row's logged time, read once; None when a row has none.
    moments = [_moment(str(when)) for when, *_ in kept] if all(when is not None for when, *_ in kept) else None
    if arrival == "uniform" and moments is not None:
        # Stable: rows of one second keep their file order.
        order = sorted(range(len(kept)), key=moments.__getitem__)
        kept, moments = [kept[i] for i in order], [moments[i] for i in order]
    span_s = max(moments) - min(moments) if moments is not None else None
    if arrival == "logged":
        if moments is None or span_s is None:
            raise SimulationError("--arrival logged needs a `time` on every row (decision logs have one)")
        first, span = min(moments), span_s
        places = [(moment - first) / span * (1 - 1 / len(kept)) if span > 0 else index / len(kept)
                  for index, moment in enumerate(moments)]
    else:
        places = [index / len(kept) for index in range(len(kept))]
    requests = [Request(at, chosen, probabilities, _costs(prompt, completion, tier_prices), prompt)
                for at, (_, chosen, probabilities, prompt, completion) in zip(places, kept, strict=True)]
    requests.sort(key=lambda request: request.at)
    return Replay(requests, skipped, span_s)


def _costs(prompt: float, completion: float, tier_prices: Sequence[tuple[float, float]]) -> tuple[float, ...]:
    """USD of a request of these tokens on each tier."""
    return tuple((prompt * price_in + completion * price_out) / 1e6 for price_in, price_out in tier_prices)


def _moment(when: str) -> float:
    try:
        return datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise SimulationError(f"a row's time {when[:40]!r} is not an ISO 8601 time") from None


def _sized_like_the_answered(kept: list, refused: set[int]) -> list:
    """Requests a spent budget refused, given the mean tokens of the answered ones (the defaults only
    when none was answered): they have no usage, and the defaults may be far from the traffic."""
    answered = [row for index, row in enumerate(kept) if index not in refused]
    if not answered:
        return kept
    prompt = sum(row[3] for row in answered) / len(answered)
    completion = sum(row[4] for row in answered) / len(answered)
    return [(*row[:3], prompt, completion) if index in refused else row for index, row in enumerate(kept)]


def compare(requests: Sequence[Request], tiers: Sequence[str], tier_prices: Sequence[tuple[float, float]],
            rule: BudgetRule, allowed: Sequence[int] | None = None) -> dict:
    """Unpaced, hard cap and paced over the same requests; `rule.usd` is the budget."""
    allowed = list(allowed if allowed is not None else range(len(tiers)))
    prices = list(tier_prices)
    unpaced = simulate(requests, tiers, None, allowed, prices, "unpaced")
    hard = simulate(requests, tiers, BudgetRule(rule.usd, pacing=False, on_exhausted=rule.on_exhausted),
                    allowed, prices, "hard cap")
    paced = simulate(requests, tiers, rule, allowed, prices, "paced")
    return {"requests": len(requests), "budget_usd": rule.usd, "rule": asdict(rule), "tiers": list(tiers),
            "tier_prices_usd_per_mtok": [list(price) for price in tier_prices],
            "budget_share_of_unpaced": rule.usd / unpaced.spend_usd if unpaced.spend_usd > 0 else None,
            "policies": {o.name: o.summary(rule.usd) for o in (unpaced, hard, paced)},
            "curve": {"elapsed": [(i + 1) / CURVE_POINTS for i in range(CURVE_POINTS)],
                      **{o.name: o.curve for o in (unpaced, hard, paced)}}}


def within(requests: Sequence[Request], allowed: Sequence[int]) -> list[Request]:
    """Requests of a log routed without a tenant's tiers, each moved up to the nearest tier the tenant may
    use (what the classifier picks when asked with allowed_tiers, up to how close the two tiers scored)."""
    return [request if request.chosen in allowed else replace(
        request, chosen=next((tier for tier in allowed if tier > request.chosen), allowed[-1]))
        for request in requests]


def budget_for(requests: Sequence[Request], budget_usd: float | None, budget_share: float | None) -> float:
    """The budget: given in USD, or as a share of the unpaced spend of these requests."""
    if budget_usd is not None:
        return budget_usd
    unpaced = sum(request.costs[request.chosen] for request in requests)
    if unpaced <= 0:
        raise SimulationError("these requests cost nothing at the model's prices: give --budget-usd")
    return unpaced * (budget_share if budget_share is not None else 0.5)


def usd(amount: float) -> str:
    """Dollars to four places, or to three significant digits below a cent: the handful of requests of
    a fresh decision log costs millionths of a dollar, which four places would show as $0.0000."""
    if amount == 0 or abs(amount) >= 0.01:
        return f"${amount:,.4f}"
    return f"${amount:.{2 - math.floor(math.log10(abs(amount)))}f}"


def print_report(report: dict) -> None:
    budget = report["budget_usd"]
    print(f"{report['requests']} requests, budget {usd(budget)} "
          f"({report['budget_share_of_unpaced']:.0%} of the unpaced spend)\n")
    print("| policy | spend | of budget | served | downgraded | refused | mean P(good answer) | by tier |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in report["policies"].items():
        quality = f"{row['mean_p_good']:.3f}" if row["mean_p_good"] is not None else "n/a"
        tiers = ", ".join(f"{tier} {count}" for tier, count in row["by_tier"].items())
        print(f"| {name} | {usd(row['spend_usd'])} | {row['spend_vs_budget']:.1%} | {row['served']} | "
              f"{row['downgrades']} | {row['refused']} | {quality} | {tiers} |")
    curve = report["curve"]
    print("\nSpend over the period (share of the budget):\n")
    print("| elapsed | budget line | unpaced | hard cap | paced |")
    print("|---|---|---|---|---|")
    for index in range(CURVE_POINTS // 10 - 1, CURVE_POINTS, CURVE_POINTS // 10):
        elapsed = curve["elapsed"][index]
        print(f"| {elapsed:.0%} | {elapsed:.0%} | " + " | ".join(
            f"{curve[name][index] / budget:.1%}" for name in ("unpaced", "hard cap", "paced")) + " |")


def plot(report: dict, path: Path) -> bool:
    """Spend over the period and the budget line, as a PNG; False (and a message) without matplotlib."""
    try:  # a Figure of its own, not pyplot's, which would switch the backend of a notebook that calls this
        from matplotlib.figure import Figure
    except ImportError:
        print("(no plot: matplotlib is not installed; pip install matplotlib)")
        return False
    curve, budget = report["curve"], report["budget_usd"]
    elapsed = [0.0, *curve["elapsed"]]
    figure = Figure(figsize=(7, 4.2))
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="even budget line")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    for name, style in (("unpaced", "--"), ("hard cap", "-."), ("paced", "-")):
        axis.plot(elapsed, [0.0] + [value / budget for value in curve[name]], style, label=name)
    axis.set_xlabel("share of the budget period elapsed")
    axis.set_ylabel("spend / budget")
    rows = report["policies"]
    axis.set_title(f"{report['requests']} requests; downgrades: hard cap {rows['hard cap']['downgrades']}, "
                   f"paced {rows['paced']['downgrades']}", fontsize=10)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


# The longest a budget period lasts (a month: 31 days), for saying when a replay spans more than one.
PERIOD_SECONDS = {"day": 86400.0, "month": 31 * 86400.0}


def main(inputs: Sequence[Path], out: Path, png: Path | None, *, budget_usd: float | None = None,
         budget_share: float | None = None, band: float = 0.1, max_quality_loss: float = 0.5,
         on_exhausted: OnExhausted = "cheapest", model: Path | None = None,
         default_tokens: tuple[int, int] = (500, 300), arrival: str = "uniform", tenant: str | None = None,
         allowed_tiers: Sequence[str] | None = None, period: Period | None = None) -> dict:
    """Run the comparison and report it. The budget: `budget_usd`, else `budget_share` (default 0.5) of
    the unpaced spend; the other settings are a tenant's `budget:` fields. `period`: the budget's (a
    tenant's from a config), against which rows logged over a longer span are said to be replayed as one.

    Raises:
        PromptierError: unreadable inputs or artifact, or nothing to replay.
    """
    from classifier.artifact import load_manifest
    from classifier.runtime import DEFAULT_MODEL_DIR

    manifest = load_manifest(model or DEFAULT_MODEL_DIR)
    tiers = [tier.name for tier in manifest.tiers]
    tier_prices = [(tier.input_usd_per_mtok, tier.output_usd_per_mtok) for tier in manifest.tiers]
    unknown = [tier for tier in allowed_tiers or () if tier not in tiers]
    if unknown:
        raise SimulationError(f"allowed tiers {unknown} are not the model's tiers {tiers}")
    allowed = sorted(tiers.index(tier) for tier in allowed_tiers) if allowed_tiers else None
    replay = read_requests(inputs, tiers, tier_prices, default_tokens, arrival, tenant, manifest.policy.rule, allowed)
    requests = within(replay.requests, allowed) if allowed else replay.requests
    rule = BudgetRule(budget_for(requests, budget_usd, budget_share), pacing=True, band=band,
                      max_quality_loss=max_quality_loss, on_exhausted=on_exhausted)
    report = compare(requests, tiers, tier_prices, rule, allowed)
    report["inputs"] = [str(path) for path in inputs]
    report["skipped"] = replay.skipped
    report["arrival"] = arrival
    report["logged_span_days"] = replay.span_s / 86400 if replay.span_s is not None else None
    if period is not None and replay.span_s is not None and replay.span_s > PERIOD_SECONDS[period]:
        # One budget period is replayed: months of logs against a month's budget would read as overspent.
        report["warning"] = (f"these rows were logged over {replay.span_s / 86400:.1f} days and are replayed as one "
                             f"{period}'s budget period: give one {period}'s rows for figures of one {period}")
        print(f"budget-sim: {report['warning']}", file=sys.stderr)
    print_report(report)
    if replay.skipped:
        print(f"\nskipped rows: {replay.skipped}")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    if png is not None and plot(report, png):
        print(f"wrote {png}")
    return report
