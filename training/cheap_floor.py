"""Choosing each mode's cheap floor (see `classifier.policy`): on the probe suite's selection half.

For each candidate floor, the mode's threshold is chosen again on the validation logs with the floor
in place (so the mode still holds its quality band there), and the probes of the selection half are
routed by that pair. The floor kept is the one that best separates obvious cases at both ends: the
share of easy probes on the cheapest tier minus that of hard ones, plus the share of hard probes on
the top tier minus that of easy ones. The top end counts because a low floor can only hold the
mode's quality band if the threshold sends everything it does not floor to the top tier, easy
prompts included. No floor is kept unless it beats routing without one. The report half is never
looked at here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from classifier.artifact import PolicyConfig
from classifier.policy import choose_tiers
from classifier.runtime import TierClassifier
from training.probes import load_probes, tier_shares
from training.routing import always_top, cheapest_point_within, routing_curve

FLOOR_GRID = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def choose_cheap_floors(runtime: TierClassifier, val_probabilities: np.ndarray, val_targets: np.ndarray,
                        val_costs: np.ndarray, policy: PolicyConfig, modes: Sequence[str],
                        grid: Sequence[float] = FLOOR_GRID) -> tuple[PolicyConfig, dict[str, list[dict]]]:
    """The policy with a floor (and its re-chosen threshold) for each of `modes` where one helps, and
    the whole search per mode for the model card.

    `runtime` is the artifact as written without floors: its decisions say which probes the prior
    routes (a floor never touches those) and give the calibrated probabilities of the rest.
    """
    unknown = sorted(set(modes) - set(policy.thresholds))
    if unknown:
        raise ValueError(f"cheap_floor_modes names modes the policy does not have: {unknown}")
    probes = [probe for probe in load_probes() if probe.half == "select"]
    decisions = runtime.classify_batch([probe.prompt for probe in probes])
    tiers = runtime.tier_names
    probabilities = np.array([[decision.scores[tier] for tier in tiers] for decision in decisions])
    by_prior = np.array([decision.decided_by == "prior" for decision in decisions])
    prior_tiers = np.array([tiers.index(decision.tier) for decision in decisions])
    hard = np.array([probe.difficulty == "hard" for probe in probes])
    everything = np.ones(len(tiers), dtype=bool)
    top_quality, _ = always_top(val_targets, val_costs)

    def routed(threshold: float, floor: float | None) -> np.ndarray:
        chosen = choose_tiers(probabilities, threshold, everything, policy.rule, floor)
        return np.where(by_prior, prior_tiers, chosen)

    thresholds, floors = dict(policy.thresholds), dict(policy.cheap_floors)
    searched: dict[str, list[dict]] = {}
    for mode in modes:
        min_quality = (1.0 - policy.quality_bands[mode]) * top_quality
        candidates: list[tuple[float | None, float, bool]] = [(None, policy.thresholds[mode], True)]
        for candidate in grid:
            curve = routing_curve(val_probabilities, val_targets, val_costs, rule=policy.rule,
                                  cheap_floor=candidate)
            point = cheapest_point_within(curve, min_quality)
            # A floor that sends so much to the cheapest tier that no threshold restores the band is
            # out, however well it separates the probes.
            candidates.append((candidate, point.threshold if point else 1.0, point is not None))
        rows: list[dict] = []
        for floor, threshold, holds_band in candidates:
            shares = tier_shares(tiers, np.array(tiers)[routed(threshold, floor)], hard)
            separation = (shares["easy_on_cheapest"] - shares["hard_on_cheapest"]
                          + shares["hard_on_top"] - shares["easy_on_top"])
            rows.append({"floor": floor, "threshold": threshold, "holds_band": holds_band,
                         "separation": separation, **shares})
        # Ties go to the candidate listed first: no floor, then the highest (most cautious) floor. Rounding
        # keeps sums of equal shares taken in another order tied; an undefined separation (a half without
        # easy or without hard probes) never wins.
        best = max((row for row in rows if row["holds_band"]), key=_rank)
        searched[mode] = rows
        thresholds[mode] = best["threshold"]
        if best["floor"] is None:
            floors.pop(mode, None)
        else:
            floors[mode] = best["floor"]
    return policy.model_copy(update={"thresholds": thresholds, "cheap_floors": floors}), searched


def _rank(row: Mapping[str, float]) -> float:
    separation = row["separation"]
    return -math.inf if math.isnan(separation) else round(separation, 9)


def floors_table(searched: Mapping[str, list[dict]]) -> str:
    """The floor search as Markdown, one row per candidate."""
    lines = ["| mode | floor | threshold | easy -> cheapest | hard -> cheapest | easy -> top | hard -> top "
             "| separation |", "|---|---|---|---|---|---|---|---|"]
    for mode, rows in searched.items():
        lines += [f"| {mode} | {'none' if r['floor'] is None else r['floor']} | {r['threshold']:.4f} | "
                  f"{r['easy_on_cheapest']:.1%} | {r['hard_on_cheapest']:.1%} | {_share(r, 'easy_on_top')} | "
                  f"{_share(r, 'hard_on_top')} | {_separation(r)} |" for r in rows]
    return "\n".join(lines)


def _share(row: Mapping[str, float], key: str) -> str:
    # Searches recorded before the top end was scored lack its shares.
    return f"{row[key]:.1%}" if key in row else "-"


def _separation(row: Mapping[str, float]) -> str:
    return f"{row['separation']:.3f}" if row.get("holds_band", True) else "cannot hold the band"
