"""The routing rule and its per-request overrides."""

import numpy as np
import pytest

from classifier.artifact import CurvePoint, PolicyConfig
from classifier.errors import InvalidInputError
from classifier.policy import (
    RoutingRequest,
    allowed_mask,
    choose_tier,
    choose_tiers,
    relative_scores,
    resolve_floor,
    resolve_threshold,
)

POLICY = PolicyConfig(
    default_mode="balanced",
    thresholds={"quality": 0.8, "balanced": 0.6, "cost": 0.4},
    quality_bands={"quality": 0.005, "balanced": 0.02, "cost": 0.06},
    curve=[CurvePoint(threshold=t, top_share=t * 0.5, quality=0.5, cost_usd=1.0) for t in (0.0, 0.5, 1.0)],
)


def test_cheapest_tier_reaching_relative_threshold() -> None:
    probabilities = np.array([[0.4, 0.6, 0.6], [0.4, 0.7, 0.8], [0.1, 0.4, 0.8], [0.05, 0.08, 0.1]])
    relative = relative_scores(probabilities, np.ones(3, dtype=bool))
    assert relative[0].tolist() == pytest.approx([0.4, 0.5, 0.5])
    chosen = choose_tiers(probabilities, 0.4, np.ones(3, dtype=bool))
    # row 0: 0.4 / (0.4 + 0.6) = 0.4 passes (ties pass); row 1: 0.4/1.2 < 0.4, 0.7/1.5 passes;
    # row 2: nothing cheaper reaches it, so the top tier.
    assert chosen.tolist()[:3] == [0, 1, 2]
    # A prompt no tier is likely to answer goes cheap: 0.05 / 0.15 = 0.33 of "as good as the top".
    assert choose_tiers(probabilities, 0.33, np.ones(3, dtype=bool))[3] == 0
    assert choose_tiers(probabilities, 1.0, np.ones(3, dtype=bool)).tolist() == [2, 2, 2, 2]
    assert choose_tiers(probabilities, 0.0, np.ones(3, dtype=bool)).tolist() == [0, 0, 0, 0]
    assert choose_tiers(np.zeros((1, 3)), 0.5, np.ones(3, dtype=bool)).tolist() == [0]


def test_allowed_tiers_restrict_choice_and_fallback() -> None:
    probabilities = np.array([[0.9, 0.9, 0.95], [0.1, 0.8, 0.95]])
    allowed = allowed_mask(["small", "medium", "large"], ["medium"])
    assert choose_tiers(probabilities, 0.5, allowed).tolist() == [1, 1]
    # Relative to the top *allowed* tier (medium here), not to the large tier.
    per_row = np.array([[True, True, False], [True, True, False]])
    assert choose_tiers(probabilities, 0.5, per_row).tolist() == [0, 1]


def test_resolve_threshold_modes_and_errors() -> None:
    assert resolve_threshold(POLICY, None) == 0.6
    assert resolve_threshold(POLICY, RoutingRequest(mode="cost")) == 0.4
    assert resolve_threshold(POLICY, RoutingRequest(threshold=0.3)) == 0.3
    assert resolve_threshold(POLICY, RoutingRequest(top_share=0.25)) == pytest.approx(0.5)
    for bad in (RoutingRequest(mode="cheap"), RoutingRequest(threshold=1.5),
                RoutingRequest(threshold=float("nan")), RoutingRequest(mode="cost", threshold=0.2),
                RoutingRequest(top_share=-0.1)):
        with pytest.raises(InvalidInputError):
            resolve_threshold(POLICY, bad)
    with pytest.raises(InvalidInputError, match="unknown tier"):
        allowed_mask(["small", "large"], ["huge"])
    with pytest.raises(InvalidInputError, match="empty"):
        allowed_mask(["small", "large"], [])


def test_a_blank_mode_or_a_flag_for_a_number_is_refused_not_routed() -> None:
    """An empty mode is no mode the artifact has (not its default one), and True or False is no threshold
    or share (pydantic would read them as 1.0 and 0.0: every prompt to the top tier, or the cheapest)."""
    with pytest.raises(InvalidInputError, match="unknown mode ''"):
        resolve_threshold(POLICY, RoutingRequest(mode=""))
    assert resolve_floor(PolicyConfig(**{**POLICY.model_dump(), "cheap_floors": {"balanced": 0.7}}),
                         RoutingRequest(mode="")) is None
    for field in ("threshold", "top_share"):
        for flag in (True, False, np.bool_(True), "0.5", b"0.5"):  # a flag, or text never converted
            with pytest.raises(InvalidInputError, match=f"routing request {field}: must be a number, got"):
                RoutingRequest(**{field: flag})
    assert RoutingRequest(threshold=1).threshold == 1.0  # numbers of any type still are numbers
    assert RoutingRequest(top_share=np.float32(0.25)).top_share == pytest.approx(0.25)


def test_difference_rule_keeps_prompts_no_tier_answers_cheap() -> None:
    # Row 0: every tier answers; row 1: no tier answers; row 2: only the top tier answers.
    probabilities = np.array([[0.95, 0.96, 0.97], [0.02, 0.03, 0.08], [0.1, 0.3, 0.9]])
    everything = np.ones(3, dtype=bool)
    relative = relative_scores(probabilities, everything, "difference")
    assert relative[:, 0] == pytest.approx([0.49, 0.47, 0.1])
    assert choose_tiers(probabilities, 0.45, everything, "difference").tolist() == [0, 0, 2]
    # The ratio rule sends the hopeless prompt to the top tier: 0.02 / (0.02 + 0.08) = 0.2.
    assert choose_tiers(probabilities, 0.45, everything, "ratio").tolist() == [0, 2, 2]
    assert choose_tiers(probabilities, 1.0, everything, "difference").tolist() == [2, 2, 2]
    assert choose_tiers(probabilities, 0.0, everything, "difference").tolist() == [0, 0, 0]
    # Threshold 1 is the top tier even where its probability underflows to 0, whose ratio for any cheaper
    # tier is then 1 (and whose difference is 1 for a cheaper tier at probability 1).
    underflow = np.array([[0.3, 0.2, 0.0], [1.0, 0.5, 0.0]])
    for rule in ("ratio", "difference"):
        assert choose_tiers(underflow, 1.0, everything, rule).tolist() == [2, 2]
        assert choose_tiers(underflow, 1.0, np.array([True, True, False]), rule).tolist() == [1, 1]
        assert [choose_tier(row, 1.0, rule=rule) for row in underflow.tolist()] == [2, 2]


def test_cheap_floor_takes_the_cheapest_tier_when_it_is_likely_enough() -> None:
    probabilities = np.array([[0.85, 0.9, 0.99], [0.5, 0.9, 0.99], [0.95, 0.2, 0.99]])
    everything = np.ones(3, dtype=bool)
    assert choose_tiers(probabilities, 0.49, everything).tolist() == [2, 2, 2]
    assert choose_tiers(probabilities, 0.49, everything, cheap_floor=0.8).tolist() == [0, 2, 0]
    # Per row; NaN is no floor for that row.
    per_row = np.array([[0.8], [np.nan], [np.nan]])
    assert choose_tiers(probabilities, 0.49, everything, cheap_floor=per_row).tolist() == [0, 2, 2]
    # With the cheapest tier not allowed there is no floor: it was chosen on that tier's probabilities, and a
    # dearer tier's run higher. Were it applied to the cheapest allowed one, forbidding a tier the request
    # never went to would send it to a cheaper one than before (row 1: large with every tier; medium, whose
    # probability 0.9 passes the floor, were the floor medium's).
    no_small = np.array([[False, True, True]] * 3)
    assert choose_tiers(probabilities, 0.49, no_small, cheap_floor=0.85).tolist() == [2, 2, 2]
    assert [choose_tier(row, 0.49, [False, True, True], cheap_floor=0.85) for row in probabilities] == [2, 2, 2]
    assert choose_tiers(probabilities, 0.49, everything, cheap_floor=0.85).tolist() == [0, 2, 0]


def test_cheap_floor_follows_the_mode_never_an_explicit_threshold() -> None:
    policy = POLICY.model_copy(update={"cheap_floors": {"balanced": 0.8, "cost": 0.7}})
    assert resolve_floor(policy, None) == 0.8
    assert resolve_floor(policy, RoutingRequest(mode="cost")) == 0.7
    assert resolve_floor(policy, RoutingRequest(mode="quality")) is None
    assert resolve_floor(policy, RoutingRequest(threshold=0.5)) is None
    assert resolve_floor(policy, RoutingRequest(top_share=0.2)) is None
    assert resolve_floor(POLICY, None) is None
    with pytest.raises(ValueError, match="cheap floor must be in"):
        PolicyConfig(**{**POLICY.model_dump(), "cheap_floors": {"balanced": 1.5}})
    with pytest.raises(ValueError, match="no threshold"):
        PolicyConfig(**{**POLICY.model_dump(), "cheap_floors": {"thrifty": 0.5}})


@pytest.mark.parametrize("rule", ["ratio", "difference"])
def test_one_row_policy_chooses_as_the_vectorised_one(rule: str) -> None:
    rng = np.random.default_rng(7)
    # Probabilities on a coarse grid, so that ties between tiers, with the threshold and with the
    # floor all occur, plus exact zeros and ones.
    grid = np.linspace(0.0, 1.0, 11)
    disagreements = []
    for _ in range(4000):
        n_tiers = int(rng.integers(2, 5))
        probabilities = rng.choice(grid, size=n_tiers)
        allowed = rng.random(n_tiers) < 0.7
        if not allowed.any():
            allowed[rng.integers(n_tiers)] = True
        threshold = float(rng.choice([*grid[:6], 0.45, 0.55, 1.0, rng.random()]))
        floor = None if rng.random() < 0.5 else float(rng.choice(grid))
        mask = None if allowed.all() and rng.random() < 0.5 else tuple(allowed.tolist())
        expected = choose_tiers(probabilities[None, :], threshold, allowed, rule,  # type: ignore[arg-type]
                                floor)[0]
        chosen = choose_tier(probabilities.tolist(), threshold, mask, rule, floor)  # type: ignore[arg-type]
        if chosen != expected:
            disagreements.append((probabilities.tolist(), threshold, mask, floor, chosen, int(expected)))
    assert not disagreements, disagreements[:5]


def test_forbidding_a_tier_the_request_did_not_go_to_leaves_its_tier_unchanged() -> None:
    """On random rows, thresholds and floors, under both rules: taking away the cheapest tier changes the
    choice only of the requests that went to it."""
    rng = np.random.default_rng(7)
    probabilities = rng.uniform(0.0, 1.0, size=(4000, 3))
    thresholds = rng.uniform(0.0, 1.0, size=(4000, 1))
    floors = rng.uniform(0.3, 1.0, size=(4000, 1))
    for rule in ("ratio", "difference"):
        every = choose_tiers(probabilities, thresholds, np.ones(3, dtype=bool), rule, floors)
        no_small = choose_tiers(probabilities, thresholds, np.array([False, True, True]), rule, floors)
        assert (every[every > 0] == no_small[every > 0]).all()
        assert (no_small > 0).all() and (every == 0).any()
