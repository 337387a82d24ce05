"""Routing policy: the cheapest tier whose calibrated probability reaches a threshold."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from classifier.artifact import MODES, PolicyConfig
from classifier.errors import InvalidInputError


class RoutingRequest(BaseModel):
    """A per-request override of the stored policy. At most one of mode/threshold/top_share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: str | None = None
    threshold: float | None = Field(default=None)
    top_share: float | None = Field(default=None)
    allowed_tiers: tuple[str, ...] | None = None


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
    mode = request.mode or policy.default_mode
    if mode not in policy.thresholds:
        known = ", ".join(sorted(policy.thresholds)) or ", ".join(MODES)
        raise InvalidInputError(f"unknown mode {mode!r}; known modes: {known}")
    return policy.thresholds[mode]


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


def choose_tiers(probabilities: np.ndarray, threshold: float, allowed: np.ndarray) -> np.ndarray:
    """Index of the chosen tier per row.

    The cheapest allowed tier with probability >= threshold; when none reaches it, the most
    capable allowed tier (the one a cautious router falls back on).

    Args:
        probabilities: [n, n_tiers], tiers cheapest first.
        threshold: probability a tier must reach.
        allowed: [n_tiers] or [n, n_tiers] boolean mask of tiers that may be chosen.
    """
    allowed = np.broadcast_to(allowed, probabilities.shape)
    passing = (probabilities >= threshold) & allowed
    first_passing = np.argmax(passing, axis=1)
    top_allowed = probabilities.shape[1] - 1 - np.argmax(allowed[:, ::-1], axis=1)
    return np.where(passing.any(axis=1), first_passing, top_allowed)
