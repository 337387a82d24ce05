"""What this dispatcher process last saw of each tier's upstream, for /health.

The dispatcher's own health says nothing of its upstreams: with every upstream down it still serves,
answering each request with a 502. /health tells that apart from a healthy dispatcher by each tier's
last attempt: `ok` (the upstream answered, whatever the status of a caller's own error), `failing`
(it timed out, could not be reached, or answered 5xx, 401 or a redirect, each of which moves the
request on to the next tier), or `not used yet`. Each worker process keeps its own view, from the
requests it served.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

OK, FAILING, UNUSED = "ok", "failing", "not used yet"


@dataclass
class _TierState:
    state: str = UNUSED
    failing_since: float | None = None
    consecutive_failures: int = 0
    last_error: str | None = None


class UpstreamHealth:
    """Each tier's last attempt, recorded as requests reach its upstream."""

    def __init__(self, tiers: Iterable[str], clock: Callable[[], float] = time.time) -> None:
        self._tiers = {tier: _TierState() for tier in tiers}
        self._clock = clock

    def answered(self, tier: str) -> None:
        """The tier's upstream answered a request (called on every answer: a new state only on a change)."""
        if self._tiers[tier].state != OK:
            self._tiers[tier] = _TierState(OK)

    def failed(self, tier: str, detail: str) -> None:
        """The tier's upstream failed a request (the request moved on, or got a 502)."""
        state = self._tiers[tier]
        if state.state != FAILING:
            state.state, state.failing_since, state.consecutive_failures = FAILING, self._clock(), 0
        state.consecutive_failures += 1
        state.last_error = detail

    def states(self) -> dict[str, str]:
        """Each tier's state, for anyone who may ask /health."""
        return {tier: state.state for tier, state in self._tiers.items()}

    def every_tier_failing(self) -> bool:
        """Whether the last attempt on every tier failed: no request can be answered now."""
        return all(state.state == FAILING for state in self._tiers.values())

    def failures(self) -> dict[str, dict[str, object]]:
        """Since when, how often and why each failing tier failed (for operators: the errors name tiers'
        hosts' failures, not callers' requests)."""
        return {tier: {"failing_since": state.failing_since, "consecutive_failures": state.consecutive_failures,
                       "last_error": state.last_error}
                for tier, state in self._tiers.items() if state.state == FAILING}
