"""Budget pacing: how a tenant's spend so far moves its routing toward cheaper tiers.

One decision function, `decide`, serves the live dispatcher and `promptier budget-sim` alike.

**Pressure.** A budget of `B` USD covers a calendar period (a UTC day or month). With `s` spent and a
fraction `f` of the period gone, the remaining budget allows an average rate of `(B - s) / (1 - f)` per
period for the rest of it; the even rate is `B`. Pressure is how far the allowed rate has fallen below
the even rate, in units of `band`:

    pressure = clamp((s - B f) / (band B (1 - f)), 0, 1)

It is 0 while spend is at or under the even line `B f`, and reaches 1 when the remaining budget allows
only `1 - band` of the even rate. Pressure needs spend ahead of the line to exist, so spend settles at
a steady distance above the line, `band B (1 - f) x pressure`, which shrinks to zero at the period's
end: a tenant whose traffic is steady ends the period at its budget, not `band` over it.

**Paced tier.** With pressure `r`, the request leaves the policy's tier `u` for the cheapest allowed
tier `j` whose saving, valued at `r x MAX_EXCHANGE_RATE`, is worth more than what it gives up:

    r x MAX_EXCHANGE_RATE x (cost_u - cost_j) / reference_cost  >  (p_u - p_j) + DOWNGRADE_PENALTY
    and  p_u - p_j <= max_quality_loss

`p` is the classifier's calibrated probability that a tier answers well. `cost` is the request's
estimated cost on each tier: its prompt tokens (counted as characters / 4) and ASSUMED_COMPLETION_TOKENS
at the tier's prices; `reference_cost` is that of a REFERENCE_PROMPT_TOKENS-token prompt on the dearest
tier. So pacing spends its downgrades where they save the most: large prompts and dear tiers first, the
cheapest tier rather than the next one down, and never a move that saves little (the fixed
DOWNGRADE_PENALTY: each downgrade is a change a caller can notice, so few large savings beat many
small ones). `max_quality_loss` is the operator's quality floor: no paced request gives up more than
that much probability of a good answer, whatever the pressure.

Lowering one threshold for every tier instead (what a mode does) made more downgrades than a hard cap
at the same budget: it moves medium-tier prompts to the small tier for a few cents each (measured on
the simulation's requests, serving/README.md: Tenants and budgets).

**Exhausted.** Once `s >= B`: the cheapest allowed tier, or a refusal, as configured.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Period = Literal["day", "month"]
OnExhausted = Literal["cheapest", "reject"]

PACED = "paced"
EXHAUSTED = "budget_exhausted"


@dataclass(frozen=True)
class Window:
    """One calendar period, in epoch seconds; `key` names it in the spend store (`2025-06`, `2025-06-14`)."""

    key: str
    start: float
    end: float

    def elapsed(self, now: float) -> float:
        """The fraction of the period gone at `now`, in [0, 1]."""
        return min(1.0, max(0.0, (now - self.start) / (self.end - self.start)))


def window_of(period: Period, now: float) -> Window:
    """The calendar period (UTC) that contains `now`."""
    moment = time.gmtime(now)
    if period == "day":
        start = calendar.timegm((moment.tm_year, moment.tm_mon, moment.tm_mday, 0, 0, 0))
        return Window(time.strftime("%Y-%m-%d", moment), float(start), float(start + 86400))
    start = calendar.timegm((moment.tm_year, moment.tm_mon, 1, 0, 0, 0))
    year, month = (moment.tm_year + 1, 1) if moment.tm_mon == 12 else (moment.tm_year, moment.tm_mon + 1)
    return Window(time.strftime("%Y-%m", moment), float(start), float(calendar.timegm((year, month, 1, 0, 0, 0))))


class WindowClock:
    """The current window of one period kind, recomputed only when it ends (a comparison per request)."""

    def __init__(self, period: Period) -> None:
        self.period = period
        self._window = window_of(period, time.time())

    def at(self, now: float) -> Window:
        window = self._window
        if not window.start <= now < window.end:
            window = self._window = window_of(self.period, now)
        return window


def budget_pressure(spent: float, budget: float, elapsed: float, band: float) -> float:
    """Pressure in [0, 1] (see the module docstring): 1 once spend is at the budget."""
    remaining = 1.0 - elapsed
    if spent >= budget or remaining <= 0.0:
        return 1.0
    return min(1.0, max(0.0, (spent - budget * elapsed) / (band * budget * remaining)))


# The shape of the paced decision (see the module docstring); fixed, so that the live dispatcher and
# the simulation decide alike. Chosen with the simulation on the shared outcome logs and on synthetic
# traffic of several tier mixes (serving/README.md: Tenants and budgets).
ASSUMED_COMPLETION_TOKENS = 300
REFERENCE_PROMPT_TOKENS = 1000
MAX_EXCHANGE_RATE = 4.0
DOWNGRADE_PENALTY = 0.8


def estimated_costs(prices: Sequence[tuple[float, float]], prompt_tokens: float) -> list[float]:
    """A request's estimated USD on each tier, before it is answered (ASSUMED_COMPLETION_TOKENS out)."""
    return [(prompt_tokens * price_in + ASSUMED_COMPLETION_TOKENS * price_out) / 1e6 for price_in, price_out in prices]


def reference_cost(prices: Sequence[tuple[float, float]]) -> float:
    """The estimated cost of a REFERENCE_PROMPT_TOKENS-token prompt on the dearest tier."""
    return max(estimated_costs(prices, REFERENCE_PROMPT_TOKENS), default=0.0)


def paced_tier(probabilities: Sequence[float], chosen: int, allowed: Sequence[int], costs: Sequence[float],
               reference: float, exchange_rate: float, max_quality_loss: float) -> int:
    """The tier that pacing serves instead of `chosen` (see the module docstring).

    Args:
        probabilities: calibrated probability of a good answer per tier, cheapest first.
        chosen: index of the tier the unpaced policy chose.
        allowed: indices of the tiers the tenant may use, cheapest first.
        costs: the request's `estimated_costs`.
        reference: `reference_cost` of the tiers (0: prices unknown, nothing is paced).
        exchange_rate: probability of a good answer a reference cost saved is worth (pressure x
            MAX_EXCHANGE_RATE).
        max_quality_loss: the most probability of a good answer a downgrade may give up.
    """
    if exchange_rate <= 0.0 or reference <= 0.0:
        return chosen
    for tier in allowed:
        if tier >= chosen:
            break
        loss = probabilities[chosen] - probabilities[tier]
        if loss <= max_quality_loss and exchange_rate * (costs[chosen] - costs[tier]) / reference > (
                loss + DOWNGRADE_PENALTY):
            return tier
    return chosen


@dataclass(frozen=True)
class BudgetRule:
    """A tenant's budget as the decision needs it (built from its config, or by the simulation)."""

    usd: float
    pacing: bool = True
    band: float = 0.1
    max_quality_loss: float = 0.5
    on_exhausted: OnExhausted = "cheapest"


@dataclass(frozen=True)
class BudgetDecision:
    tier: int  # the tier to serve (the chosen one when nothing moved it)
    reason: str | None  # PACED, EXHAUSTED, or None when the budget changed nothing
    pressure: float
    reject: bool = False  # exhausted, and the rule refuses instead of serving the cheapest tier
    exhausted: bool = False  # the period's budget is spent (whether or not that moved the request)


def decide(rule: BudgetRule, spent: float, elapsed: float, chosen: int, probabilities: Sequence[float] | None,
           allowed: Sequence[int], prices: Sequence[tuple[float, float]], prompt_tokens: float) -> BudgetDecision:
    """Apply a budget to one request whose policy chose tier `chosen`.

    Args:
        probabilities: None when the classifier did not score the request (a pinned tier, a fallback, a
            prompt the prior decided): such a request is not paced, only stopped at exhaustion.
        allowed: the tenant's tiers, sorted cheapest first, non-empty.
        prices: (input, output) USD per million tokens of every tier, cheapest first ([]: unknown).
        prompt_tokens: the request's prompt tokens, or an estimate of them.
    """
    if spent >= rule.usd:
        if rule.on_exhausted == "reject":
            return BudgetDecision(chosen, EXHAUSTED, 1.0, reject=True, exhausted=True)
        cheapest = allowed[0]
        return BudgetDecision(cheapest, EXHAUSTED if cheapest < chosen else None, 1.0, exhausted=True)
    pressure = budget_pressure(spent, rule.usd, elapsed, rule.band)
    if not rule.pacing or probabilities is None or pressure <= 0.0 or not prices:
        return BudgetDecision(chosen, None, pressure)
    tier = paced_tier(probabilities, chosen, allowed, estimated_costs(prices, prompt_tokens), reference_cost(prices),
                      pressure * MAX_EXCHANGE_RATE, rule.max_quality_loss)
    return BudgetDecision(tier, PACED if tier != chosen else None, pressure)
