"""Metrics for tier classifiers and routers. Pure numpy, checked against hand-computed curves in tests.

Binary routing metrics follow RouteLLM (Ong et al., 2024): between a weak (cheapest) and a strong
(most capable) tier, a router sends the prompts it scores as hardest to the strong tier.
PGR = (quality - weak quality) / (strong quality - weak quality); APGR is the area under PGR as a
function of the share of strong calls (0 to 1); CPT(x) is the smallest share of strong calls
that reaches PGR x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC-AUC with ties counted half (Mann-Whitney U); None when only one class is present."""
    labels = labels.astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def brier(probabilities: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean((probabilities - targets) ** 2))


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = 10) -> float:
    """Weighted mean |mean predicted - mean observed| over equal-width probability bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.sum() * abs(probabilities[members].mean() - targets[members].mean())
    return float(total / max(len(probabilities), 1))


def tier_metrics(probabilities: np.ndarray, targets: np.ndarray, tier_names: list[str]) -> dict[str, dict]:
    """Per tier, over prompts whose outcome is known: AUC (outcome >= 0.5 is a success), Brier, ECE."""
    result = {}
    for k, name in enumerate(tier_names):
        known = ~np.isnan(targets[:, k])
        p, y = probabilities[known, k], targets[known, k]
        result[name] = {
            "n": int(known.sum()),
            "roc_auc": roc_auc(p, y >= 0.5) if known.any() else None,
            "brier": brier(p, y) if known.any() else None,
            "ece": expected_calibration_error(p, y) if known.any() else None,
        }
    return result


@dataclass(frozen=True)
class BinaryCurve:
    """Quality as a function of the share of prompts sent to the strong tier."""

    strong_share: np.ndarray  # 0 .. 1, n + 1 points
    quality: np.ndarray
    weak_quality: float
    strong_quality: float

    @property
    def pgr(self) -> np.ndarray:
        gap = self.strong_quality - self.weak_quality
        if abs(gap) < 1e-12:
            return np.zeros_like(self.quality)
        return (self.quality - self.weak_quality) / gap


def binary_curve(hardness: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> BinaryCurve:
    """Send the k hardest prompts (highest `hardness`) to the strong tier, for every k.

    Prompts with equal hardness are indistinguishable to the router, so within a tie group the
    curve is the expectation under a random order: linear between the group's end points. This makes
    a constant score (and hence random routing) give exactly the straight line from weak to strong.
    """
    n = len(hardness)
    order = np.argsort(-hardness, kind="stable")
    gains = (strong - weak)[order]
    sorted_hardness = hardness[order]
    cumulative = np.concatenate([[0.0], np.cumsum(gains)])
    # Group boundaries: positions where the hardness changes (plus both ends).
    boundaries = np.concatenate([[0], np.flatnonzero(np.diff(sorted_hardness) != 0) + 1, [n]])
    positions = np.arange(n + 1)
    expected_gain = np.interp(positions, boundaries, cumulative[boundaries])
    quality = (weak.sum() + expected_gain) / n
    return BinaryCurve(positions / n, quality, float(weak.mean()), float(strong.mean()))


def apgr(curve: BinaryCurve) -> float:
    """Area under PGR over strong-call share in [0, 1] (trapezoid rule)."""
    pgr, x = curve.pgr, curve.strong_share
    return float(np.sum((pgr[1:] + pgr[:-1]) / 2.0 * np.diff(x)))


def cpt(curve: BinaryCurve, target_pgr: float) -> float | None:
    """Smallest strong-call share whose PGR reaches `target_pgr` (interpolated); None if never."""
    pgr, x = curve.pgr, curve.strong_share
    reached = np.flatnonzero(pgr >= target_pgr - 1e-12)
    if reached.size == 0:
        return None
    i = int(reached[0])
    if i == 0:
        return 0.0
    # Linear interpolation between the last point below and the first point at or above.
    fraction = (target_pgr - pgr[i - 1]) / (pgr[i] - pgr[i - 1])
    return float(x[i - 1] + fraction * (x[i] - x[i - 1]))


def apgr_difference_interval(hardness: np.ndarray, baseline_hardness: np.ndarray, weak: np.ndarray,
                             strong: np.ndarray, resamples: int = 1000, level: float = 0.95,
                             seed: int = 0) -> tuple[float, float]:
    """Percentile interval of APGR(hardness) - APGR(baseline_hardness) under a paired bootstrap.

    Both routers are scored on the same resampled prompts, so the interval reflects how much of a
    difference between them is the luck of which prompts a source happened to contain. An interval
    that straddles zero means the prompts at hand cannot tell the two apart.
    """
    rng = np.random.default_rng(seed)
    n = len(weak)
    gains = strong - weak
    differences = np.empty(resamples)
    # A resample is a count per prompt; scoring counts keeps each router's one sort of the prompts.
    chunk = max(1, min(resamples, 2_000_000 // max(n, 1)))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        drawn = rng.integers(0, n, (size, n)) + (np.arange(size) * n)[:, None]
        counts = np.bincount(drawn.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)
        differences[start : start + size] = (resampled_apgrs(hardness, gains, counts)
                                             - resampled_apgrs(baseline_hardness, gains, counts))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(differences, [tail, 1.0 - tail])
    return float(low), float(high)


def resampled_apgrs(hardness: np.ndarray, gains: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """APGR of one router on each resample, a resample given as how many times it holds each prompt.

    The same curve as `binary_curve` on the resampled prompts: prompts sorted hardest first, tie
    groups (including a prompt drawn more than once) interpolated linearly, so the area is the
    trapezoid rule over the tie groups' end points. `gains` is strong - weak per prompt.
    """
    n_resamples, n = counts.shape
    order = np.argsort(-hardness, kind="stable")
    group_ends = np.concatenate([np.flatnonzero(np.diff(hardness[order]) != 0), [n - 1]])
    weights = counts[:, order]
    start = np.zeros((n_resamples, 1))
    share = np.concatenate([start, np.cumsum(weights, axis=1)[:, group_ends]], axis=1) / n
    gained = np.concatenate([start, np.cumsum(weights * gains[order], axis=1)[:, group_ends]], axis=1)
    area = np.sum(np.diff(share, axis=1) * (gained[:, 1:] + gained[:, :-1]) / 2.0, axis=1)
    total = gained[:, -1]
    # As in BinaryCurve.pgr: no gap between the tiers means no gap to recover.
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(total) < 1e-12 * n, 0.0, area / total)
