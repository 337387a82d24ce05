"""Simulated routing on logged outcomes: what quality and cost a threshold would have given.

A prompt may only be routed to tiers whose outcome the log has (the others are unknown, not
failures); when no allowed tier reaches the threshold it goes to its most capable known tier.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from classifier.artifact import CurvePoint, Rule
from classifier.policy import choose_tiers, relative_scores, top_allowed_tier


@dataclass(frozen=True)
class RoutingPoint:
    threshold: float
    quality: float
    cost_usd: float
    top_share: float


def top_known_tier(known: np.ndarray) -> np.ndarray:
    """Index of the most capable tier with a known outcome, per row."""
    return top_allowed_tier(known)


def simulate(probabilities: np.ndarray, targets: np.ndarray, costs: np.ndarray, threshold: float,
             rule: Rule = "ratio", cheap_floor: float | None = None) -> RoutingPoint:
    """Mean quality and mean cost per prompt, at one threshold, and the share of the prompts it decides
    (`decided_rows`) that it sends to their top known tier."""
    known = ~np.isnan(targets)
    chosen = choose_tiers(probabilities, threshold, known, rule, cheap_floor)
    rows = np.arange(len(chosen))
    decided = decided_rows(known)
    return RoutingPoint(
        threshold=float(threshold),
        quality=float(np.mean(targets[rows, chosen])),
        cost_usd=float(np.mean(costs[rows, chosen])),
        top_share=float(np.mean(chosen[decided] == top_known_tier(known)[decided])) if decided.any() else 0.0,
    )


def decided_rows(known: np.ndarray) -> np.ndarray:
    """Which prompts a threshold can route: those known on more than one tier.

    A prompt known on one tier (a served request) goes to that tier at every threshold, the cheapest as
    well as the top one; counted in the top tier's share, it would say that threshold 0 sends prompts to
    the top tier, and a `top_share` request would be mapped to a threshold that sends fewer than asked.
    """
    return np.count_nonzero(known, axis=1) > 1


def threshold_grid(probabilities: np.ndarray, known: np.ndarray, points: int = 201,
                   rule: Rule = "ratio") -> np.ndarray:
    """Thresholds at the quantiles of the relative scores, plus both ends, so every region of the curve
    is sampled."""
    relative = relative_scores(probabilities, known, rule)
    finite = relative[known & np.isfinite(relative)]
    quantiles = np.quantile(finite, np.linspace(0, 1, points)) if finite.size else np.array([])
    return np.unique(np.clip(np.concatenate([[0.0, 1.0], quantiles]), 0.0, 1.0))


def routing_curve(probabilities: np.ndarray, targets: np.ndarray, costs: np.ndarray,
                  thresholds: np.ndarray | None = None, rule: Rule = "ratio",
                  cheap_floor: float | None = None) -> list[RoutingPoint]:
    grid = threshold_grid(probabilities, ~np.isnan(targets), rule=rule) if thresholds is None else thresholds
    return [simulate(probabilities, targets, costs, float(t), rule, cheap_floor) for t in grid]


def always_top(targets: np.ndarray, costs: np.ndarray) -> tuple[float, float]:
    """Quality and mean cost per prompt of always calling the most capable known tier."""
    top = top_known_tier(~np.isnan(targets))
    rows = np.arange(len(top))
    return float(np.mean(targets[rows, top])), float(np.mean(costs[rows, top]))


def cheapest_point_within(curve: list[RoutingPoint], min_quality: float) -> RoutingPoint | None:
    """The lowest-cost point whose quality is at least `min_quality` (ties: higher quality)."""
    eligible = [p for p in curve if p.quality >= min_quality - 1e-12]
    if not eligible:
        return None
    return min(eligible, key=lambda p: (p.cost_usd, -p.quality))


def mode_thresholds(curve: list[RoutingPoint], top_quality: float, bands: Mapping[str, float]) -> dict[str, float]:
    """For each mode, the threshold of the cheapest point within its band of the top tier's quality."""
    thresholds = {}
    for mode, band in bands.items():
        point = cheapest_point_within(curve, (1.0 - band) * top_quality)
        # No point reaches the band only if even the top tier's threshold does not: route everything up.
        thresholds[mode] = point.threshold if point is not None else 1.0
    return thresholds


def curve_points(curve: list[RoutingPoint], max_points: int = 101) -> list[CurvePoint]:
    """A thinned copy of the curve for the manifest (threshold <-> top-tier share lookups)."""
    step = max(1, len(curve) // max_points)
    kept = curve[::step] + ([curve[-1]] if (len(curve) - 1) % step else [])
    return [CurvePoint(threshold=p.threshold, top_share=p.top_share, quality=p.quality, cost_usd=p.cost_usd)
            for p in kept]
