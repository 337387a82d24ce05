"""Routing policy: the cheapest tier whose relative score reaches a threshold.

A tier's relative score compares its calibrated probability of answering well, p, with that of the
most capable allowed tier, p_top (see `relative_scores`), by one of two rules stored in the artifact:

- `difference`: (1 + p - p_top) / 2, i.e. the expected quality the cheaper tier gives up. The top tier
  is chosen where it is expected to *add* the most, so prompts every tier answers, and prompts no
  tier answers, both stay cheap. With the logged outcomes smoothed over every model of each source
  (item-response estimates standing in for a perfect router's probabilities), ranking by it recovered
  71-77% of the gap between the cheapest and the top tier on four of the five shared sources,
  against 45-63% for `ratio`.
- `ratio`: p / (p + p_top), the rule of artifacts written before `difference` existed. It sends a
  prompt no tier is likely to answer to the top tier whenever p_top is a few times p.

Both are 0.5 when the tier is as likely as the top tier to answer well, and grow with p.

A mode may also carry a *cheap floor*: the cheapest tier, when the request allows it, is taken whenever its
own calibrated probability reaches the floor, however sure the model is of the top tier. Relative rules alone send
a prompt the cheapest tier answers 85% of the time to the top tier when the top tier is put at 99%;
for obviously easy requests that is money spent on a difference the model cannot vouch for. Floors
are chosen at training time on the probe suite's selection half, with the mode's threshold re-chosen
beside each candidate so that the mode still holds its quality band on validation logs. A request
that gives an explicit threshold or top-tier share gets no floor: it asked for that rule alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from classifier.artifact import MODES, PolicyConfig, Rule
from classifier.errors import InvalidInputError


class RoutingRequest(BaseModel):
    """A per-request override of the stored policy. At most one of mode/threshold/top_share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: str | None = None
    threshold: float | None = Field(default=None)
    top_share: float | None = Field(default=None)
    allowed_tiers: tuple[str, ...] | None = None

    @field_validator("threshold", "top_share", mode="before")
    @classmethod
    def _not_a_bool(cls, value: object) -> object:
        # pydantic reads True as 1.0 and False as 0.0: a flag passed where a number belongs would send
        # every prompt to the top tier, or to the cheapest, without a word. It reads "0.5" as 0.5 too: a
        # setting read from text and never converted is a caller's slip that gRPC and the CLI never make.
        if isinstance(value, bool | np.bool_ | str | bytes):
            raise ValueError(f"must be a number, got {value!r}")
        return value

    def __init__(self, **fields: Any) -> None:
        """Raises InvalidInputError (a PromptierError, as for every other bad request) naming the field."""
        try:
            super().__init__(**fields)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "request"
            raise InvalidInputError(f"routing request {where}: {first['msg'].removeprefix('Value error, ')}") from None


def resolve_threshold(policy: PolicyConfig, request: RoutingRequest | None) -> float:
    """Turn a request (or the stored default mode) into one probability threshold.

    Raises:
        InvalidInputError: unknown mode, threshold outside [0, 1], or more than one of mode,
            threshold and top_share given.
    """
    if request is None:
        return policy.thresholds[policy.default_mode]
    given = [name for name in ("mode", "threshold", "top_share") if getattr(request, name) is not None]
    if len(given) > 1:
        raise InvalidInputError(f"give at most one of mode, threshold, top_share (got {', '.join(given)})")
    if request.threshold is not None:
        if not (np.isfinite(request.threshold) and 0.0 <= request.threshold <= 1.0):
            raise InvalidInputError(f"threshold must be in [0, 1], got {request.threshold}")
        return float(request.threshold)
    if request.top_share is not None:
        return threshold_for_top_share(policy, request.top_share)
    # An empty mode is not the default one: a setting left blank is refused, not silently routed by
    # whichever mode the artifact defaults to (gRPC's unset field arrives as None, not as "").
    mode = policy.default_mode if request.mode is None else request.mode
    if mode not in policy.thresholds:
        known = ", ".join(sorted(policy.thresholds)) or ", ".join(MODES)
        raise InvalidInputError(f"unknown mode {mode!r}; known modes: {known}")
    return policy.thresholds[mode]


def resolve_floor(policy: PolicyConfig, request: RoutingRequest | None) -> float | None:
    """The cheap floor a request routes under: its mode's (or the default mode's), or None.

    Call after `resolve_threshold`, which rejects malformed requests.
    """
    if request is None:
        return policy.cheap_floors.get(policy.default_mode)
    if request.threshold is not None or request.top_share is not None:
        return None
    return policy.cheap_floors.get(policy.default_mode if request.mode is None else request.mode)


def threshold_for_top_share(policy: PolicyConfig, top_share: float) -> float:
    """The threshold that sent about `top_share` of validation prompts to the top tier."""
    if not (np.isfinite(top_share) and 0.0 <= top_share <= 1.0):
        raise InvalidInputError(f"top_share must be in [0, 1], got {top_share}")
    if not policy.curve:
        raise InvalidInputError("this model has no validation curve, so top_share is not available")
    points = sorted(policy.curve, key=lambda point: point.top_share)
    shares = np.array([point.top_share for point in points])
    thresholds = np.array([point.threshold for point in points])
    # Top-tier share grows with the threshold, so interpolating along share is well defined.
    return float(np.interp(top_share, shares, thresholds))


def allowed_mask(tier_names: Sequence[str], allowed: Sequence[str] | None) -> np.ndarray:
    """Boolean mask over tiers. Raises InvalidInputError for an unknown or empty allowed list."""
    if allowed is None:
        return np.ones(len(tier_names), dtype=bool)
    if len(allowed) == 0:
        raise InvalidInputError("allowed_tiers is empty")
    unknown = [name for name in allowed if name not in tier_names]
    if unknown:
        raise InvalidInputError(f"unknown tier(s) {unknown}; this model's tiers are {list(tier_names)}")
    return np.array([name in allowed for name in tier_names], dtype=bool)


def relative_scores(probabilities: np.ndarray, allowed: np.ndarray, rule: Rule = "ratio") -> np.ndarray:
    """Each tier's score relative to the most capable allowed tier's, in [0, 1] (0.5: as good as it).

    `ratio`: p / (p + p_top); 0.45 means "at least 82% as likely" (p >= t / (1 - t) x p_top).
    `difference`: (1 + p - p_top) / 2; 0.45 means "at most 0.1 less likely" (p >= p_top - (1 - 2t)).
    """
    top = top_allowed_tier(np.broadcast_to(allowed, probabilities.shape))
    return _relative_to(probabilities, probabilities[np.arange(len(top)), top][:, None], rule)


def _relative_to(probabilities: np.ndarray, top_probability: np.ndarray, rule: Rule) -> np.ndarray:
    if rule == "difference":
        return np.clip((1.0 + probabilities - top_probability) / 2.0, 0.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = probabilities / (probabilities + top_probability)
    # Both zero: no tier helps at all, so any tier is as good as the top one.
    return np.where(np.isfinite(relative), relative, 0.5)


def top_allowed_tier(allowed: np.ndarray) -> np.ndarray:
    """Index of the most capable allowed tier, per row."""
    return allowed.shape[1] - 1 - np.argmax(allowed[:, ::-1], axis=1)


def choose_tiers(probabilities: np.ndarray, threshold: float | np.ndarray, allowed: np.ndarray,
                 rule: Rule = "ratio", cheap_floor: float | np.ndarray | None = None) -> np.ndarray:
    """Index of the chosen tier per row: the cheapest allowed tier whose relative score reaches `threshold`,
    else the most capable allowed tier. Threshold 1 always picks the top allowed tier, 0 the cheapest.

    Args:
        probabilities: [n, n_tiers] calibrated probabilities, tiers cheapest first.
        threshold: the relative score a cheaper tier must reach, in [0, 1]; or [n, 1], one per row.
        allowed: [n_tiers] or [n, n_tiers] boolean mask of tiers that may be chosen.
        rule: how a tier's score is compared with the top tier's (see `relative_scores`).
        cheap_floor: where the cheapest tier's own probability reaches it, that tier is chosen (when it
            is allowed: the floor was chosen on the cheapest tier's probabilities, and a dearer tier's run
            higher, so a request kept off the cheapest tier has no floor); a number, or [n, 1] per row
            (NaN: no floor for that row); None: no floor.
    """
    # Threshold 1 is the top allowed tier whatever the scores: a cheaper tier would reach it only where the
    # top tier's probability underflows to 0 (its ratio is then 1).
    below_one = np.asarray(threshold) < 1.0
    if allowed.ndim == 1 and allowed.all():  # the common case: no per-request restriction
        passing = (_relative_to(probabilities, probabilities[:, -1:], rule) >= threshold) & below_one
        if cheap_floor is not None:
            passing[:, :1] |= probabilities[:, :1] >= cheap_floor
        passing[:, -1] = True  # the top tier is where everything else falls back
        return np.argmax(passing, axis=1)
    allowed = np.broadcast_to(allowed, probabilities.shape)
    top = top_allowed_tier(allowed)
    rows = np.arange(len(top))
    passing = (_relative_to(probabilities, probabilities[rows, top][:, None], rule) >= threshold) & allowed & below_one
    if cheap_floor is not None:
        floors = np.broadcast_to(np.asarray(cheap_floor, dtype=float).reshape(-1, 1), (len(rows), 1))[:, 0]
        passing[:, 0] |= allowed[:, 0] & (probabilities[:, 0] >= floors)
    passing[rows, top] = True
    return np.argmax(passing, axis=1)


def choose_tier(probabilities: Sequence[float], threshold: float, allowed: Sequence[bool] | None = None,
                rule: Rule = "ratio", cheap_floor: float | None = None) -> int:
    """`choose_tiers` for one row, in Python floats: the serving path's policy.

    A request is one row, and numpy's fixed cost per call (a few microseconds on a 1 x 3 array, some
    twenty calls for the vectorised rule) would cost more than the arithmetic. The arithmetic is in
    float64 on the scores a result reports, so anyone can reproduce a decision from its scores (the
    model's float32 arithmetic could differ by one rounding where a score sits within ~1e-7 of the
    threshold). Tests hold both functions to the same choice on random rows, masks, thresholds and
    floors, and the runtime's every decision to its reported scores.

    Args:
        probabilities: calibrated probabilities, tiers cheapest first.
        threshold: the relative score a cheaper tier must reach, in [0, 1].
        allowed: which tiers may be chosen (None: all of them); at least one must be.
        rule: how a tier's score is compared with the top tier's (see `relative_scores`).
        cheap_floor: where the cheapest tier's own probability reaches it, that tier is chosen (when it is
            allowed; see `choose_tiers`).
    """
    candidates = range(len(probabilities)) if allowed is None else [i for i, ok in enumerate(allowed) if ok]
    top_probability = probabilities[candidates[-1]]
    if cheap_floor is not None and candidates[0] == 0 and probabilities[0] >= cheap_floor:
        return 0
    for tier in candidates[:-1] if threshold < 1.0 else ():  # 1: the top allowed tier (see choose_tiers)
        probability = probabilities[tier]
        if rule == "difference":
            relative = min(max((1.0 + probability - top_probability) / 2.0, 0.0), 1.0)
        else:
            total = probability + top_probability
            # Both zero: no tier helps at all, so any tier is as good as the top one.
            relative = probability / total if total > 0.0 else 0.5
        if relative >= threshold:
            return tier
    return candidates[-1]
