"""Choosing cheap floors on the probe suite's selection half, within each mode's quality band."""

from pathlib import Path

import numpy as np
import pytest

import classifier
from training.cheap_floor import FLOOR_GRID, choose_cheap_floors, floors_table
from training.routing import always_top, simulate


def _validation(seed: int = 0, n: int = 600) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probabilities = np.sort(rng.uniform(size=(n, 3)), axis=1)  # dearer tiers answer more often
    targets = (rng.uniform(size=(n, 3)) < probabilities).astype(float)
    costs = np.tile([0.1, 0.5, 2.0], (n, 1))
    return probabilities, targets, costs


def test_candidates_are_marked_by_whether_they_hold_the_band_and_the_best_is_kept(trained_artifact: Path) -> None:
    runtime = classifier.load(trained_artifact)
    policy = runtime.manifest.policy
    probabilities, targets, costs = _validation()
    chosen, searched = choose_cheap_floors(runtime, probabilities, targets, costs, policy, ["balanced"])
    rows = searched["balanced"]
    assert [row["floor"] for row in rows] == [None, *FLOOR_GRID]
    top_quality, _ = always_top(targets, costs)
    floor_band = (1 - policy.quality_bands["balanced"]) * top_quality
    for row in rows[1:]:
        point = simulate(probabilities, targets, costs, row["threshold"], policy.rule, row["floor"])
        # A floor no threshold can bring back within the band is never kept.
        assert (point.quality >= floor_band - 1e-12) == row["holds_band"]
        assert row["separation"] == pytest.approx(row["easy_on_cheapest"] - row["hard_on_cheapest"]
                                                  + row["hard_on_top"] - row["easy_on_top"])
    best = max((row for row in rows if row["holds_band"]), key=lambda row: row["separation"])
    assert chosen.thresholds["balanced"] == best["threshold"]
    assert chosen.cheap_floors.get("balanced") == best["floor"]
    assert {m: t for m, t in chosen.thresholds.items() if m != "balanced"} == \
        {m: t for m, t in policy.thresholds.items() if m != "balanced"}
    assert "| balanced | none |" in floors_table(searched)


def test_unknown_modes_are_refused(trained_artifact: Path) -> None:
    runtime = classifier.load(trained_artifact)
    with pytest.raises(ValueError, match="thrifty"):
        choose_cheap_floors(runtime, *_validation(n=50), runtime.manifest.policy, ["thrifty"])


def test_a_floor_that_breaks_the_quality_band_is_never_kept(trained_artifact: Path) -> None:
    runtime = classifier.load(trained_artifact)
    # The policy comes with a floor: when no candidate floor may be kept, that one goes too.
    policy = runtime.manifest.policy.model_copy(update={"cheap_floors": {"balanced": 0.99}})
    probabilities, targets, costs = _validation(seed=1)
    # The cheapest tier looks certain on every validation prompt and fails every one: any floor
    # routes everything to it, and no threshold can bring the quality back.
    probabilities[:, 0] = 0.99
    targets[:, 0] = 0.0
    chosen, searched = choose_cheap_floors(runtime, probabilities, targets, costs, policy, ["balanced"])
    assert not any(row["holds_band"] for row in searched["balanced"][1:])
    assert "balanced" not in chosen.cheap_floors
    assert chosen.thresholds["balanced"] == policy.thresholds["balanced"]
    assert "cannot hold the band" in floors_table(searched)


def test_only_the_floors_that_hold_the_band_compete(trained_artifact: Path) -> None:
    runtime = classifier.load(trained_artifact)
    policy = runtime.manifest.policy
    probabilities, targets, costs = _validation(seed=2)
    # The cheapest tier answers exactly the prompts it is surest of: high floors lose nothing, low ones
    # send it prompts it fails.
    targets[:, 0] = (probabilities[:, 0] >= 0.8).astype(float)
    chosen, searched = choose_cheap_floors(runtime, probabilities, targets, costs, policy, ["balanced"])
    rows = searched["balanced"]
    holding = {row["floor"] for row in rows[1:] if row["holds_band"]}
    assert 0.95 in holding and 0.6 not in holding
    kept = chosen.cheap_floors.get("balanced")
    assert kept is None or kept in holding

