"""Metrics against curves computed by hand."""

import numpy as np
import pytest

from training.metrics import (
    apgr,
    apgr_difference_interval,
    binary_curve,
    cpt,
    expected_calibration_error,
    resampled_apgrs,
    roc_auc,
)


def test_auc_matches_hand_count_with_ties() -> None:
    scores = np.array([0.1, 0.4, 0.4, 0.8])
    labels = np.array([0, 0, 1, 1])
    # Pairs (pos, neg): (0.4,0.1)=1, (0.4,0.4)=0.5, (0.8,0.1)=1, (0.8,0.4)=1 -> 3.5 / 4
    assert roc_auc(scores, labels) == pytest.approx(0.875)
    assert roc_auc(scores, np.ones(4)) is None


def test_binary_curve_known_ordering() -> None:
    weak = np.array([0.0, 0.0, 1.0, 1.0])
    strong = np.array([1.0, 1.0, 1.0, 0.0])
    # Route in order of hardness: prompt 0, 1, 2, 3.
    curve = binary_curve(np.array([4.0, 3.0, 2.0, 1.0]), weak, strong)
    assert curve.quality == pytest.approx([0.5, 0.75, 1.0, 1.0, 0.75])
    assert curve.weak_quality == 0.5 and curve.strong_quality == 0.75
    # PGR = (q - 0.5) / 0.25 -> [0, 1, 2, 2, 1]; trapezoid over steps of 0.25.
    assert curve.pgr == pytest.approx([0, 1, 2, 2, 1])
    assert apgr(curve) == pytest.approx(0.25 * (0.5 + 1.5 + 2 + 1.5))
    assert cpt(curve, 0.5) == pytest.approx(0.125)
    assert cpt(curve, 1.0) == pytest.approx(0.25)


def test_random_routing_is_the_straight_line() -> None:
    rng = np.random.default_rng(0)
    weak = rng.integers(0, 2, 200).astype(float)
    strong = np.maximum(weak, rng.integers(0, 2, 200)).astype(float)
    curve = binary_curve(np.zeros(200), weak, strong)  # every prompt tied: the expected random order
    assert curve.pgr == pytest.approx(np.linspace(0, 1, 201))
    assert apgr(curve) == pytest.approx(0.5)
    assert cpt(curve, 0.8) == pytest.approx(0.8)


def test_oracle_beats_random_and_reaches_full_gap_early() -> None:
    weak = np.array([1, 0, 0, 1, 0, 1, 1, 0], dtype=float)
    strong = np.array([1, 1, 0, 1, 1, 1, 0, 1], dtype=float)
    oracle = binary_curve(strong - weak, weak, strong)
    # Three prompts gain from the strong tier and one loses: after those 3 calls quality is 7/8,
    # PGR (0.875 - 0.5) / 0.25 = 1.5, above what always-strong gets.
    assert oracle.pgr.max() == pytest.approx(1.5)
    assert cpt(oracle, 1.0) <= 3 / 8
    assert apgr(oracle) > 0.5


def test_ece_perfect_and_off_by_constant() -> None:
    p = np.array([0.2, 0.2, 0.8, 0.8])
    assert expected_calibration_error(p, p.copy()) == 0
    assert expected_calibration_error(p, np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.2)


def test_apgr_of_a_resample_given_as_counts_is_the_apgr_of_the_resampled_prompts() -> None:
    rng = np.random.default_rng(2)
    weak = rng.integers(0, 2, 300).astype(float)
    strong = np.maximum(weak, rng.integers(0, 2, 300)).astype(float)
    hardness = np.round(rng.normal(0.0, 1.0, 300), 1)  # coarse: many ties, as a constant-ish router has
    drawn = rng.integers(0, 300, (4, 300))  # with replacement: repeated prompts tie with themselves
    counts = np.stack([np.bincount(rows, minlength=300) for rows in drawn]).astype(float)
    expected = [apgr(binary_curve(hardness[rows], weak[rows], strong[rows])) for rows in drawn]
    assert resampled_apgrs(hardness, strong - weak, counts) == pytest.approx(expected, abs=1e-12)


def test_apgr_lead_interval_separates_a_real_lead_from_a_tie() -> None:
    rng = np.random.default_rng(1)
    weak = rng.integers(0, 2, 400).astype(float)
    strong = np.maximum(weak, rng.integers(0, 2, 400)).astype(float)
    informed = (strong - weak) + rng.normal(0.0, 0.7, 400)
    coin, other_coin = rng.random(400), rng.random(400)
    lead = apgr(binary_curve(informed, weak, strong)) - apgr(binary_curve(coin, weak, strong))
    low, high = apgr_difference_interval(informed, coin, weak, strong, resamples=300)
    assert 0.0 < low < lead < high
    # Two routers that know nothing: their difference is the luck of the prompts, so the interval spans zero.
    low, high = apgr_difference_interval(coin, other_coin, weak, strong, resamples=300)
    assert low < 0.0 < high
    assert apgr_difference_interval(coin, coin, weak, strong, resamples=50) == (0.0, 0.0)


def test_prompts_known_on_one_tier_only_neither_score_nor_dilute_apgr() -> None:
    from training.evaluate import routing_groups, score_group

    rng = np.random.default_rng(0)
    n = 200
    weak = rng.integers(0, 2, n).astype(float)
    strong = np.maximum(weak, rng.integers(0, 2, n))
    benchmark = np.column_stack([weak, np.full(n, np.nan), strong])
    hardness = (strong - weak) + rng.normal(0, 0.5, n)
    model = np.column_stack([1 - hardness, np.full(n, 0.5), np.ones(n)])
    costs = np.tile([1.0, 2.0, 3.0], (n, 1))
    alone = score_group({"model": model}, benchmark, costs, ["s", "m", "l"])["methods"]["model"]["apgr"]
    # Requests a dispatcher served, each known on the one tier that answered.
    served = np.array([[1.0, np.nan, np.nan], [np.nan, np.nan, 0.0]] * 30)
    served_model = np.tile([0.9, 0.5, 1.0], (60, 1))
    targets = np.vstack([benchmark, served])
    sources = np.array(["bench"] * n + ["dispatcher"] * 60, dtype=object)
    groups = routing_groups(sources, targets)
    assert list(groups) == ["all", "bench"]  # no APGR for a source no prompt of which two tiers know
    mixed = score_group({"model": np.vstack([model, served_model])}, targets, np.tile([1.0, 2.0, 3.0], (n + 60, 1)),
                        ["s", "m", "l"])["methods"]["model"]["apgr"]
    assert mixed == pytest.approx(alone)  # and they do not dilute the whole's


def test_a_threshold_that_sends_every_prompt_to_the_cheapest_tier_has_no_top_tier_share() -> None:
    """A served request is known on the one tier that answered it and goes there at every threshold: it is
    not a prompt sent to the top tier, so it must not put a floor under the curve's top-tier share (which
    a `top_share` request is mapped through)."""
    from training.routing import simulate

    benchmark = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, np.nan, 0.0]])
    served = np.array([[1.0, np.nan, np.nan]] * 3 + [[np.nan, np.nan, 0.0]])  # cheapest tier x3, top tier x1
    targets = np.vstack([benchmark, served])
    probabilities = np.tile([0.5, 0.7, 0.9], (len(targets), 1))
    costs = np.tile([1.0, 2.0, 3.0], (len(targets), 1))
    cheapest, top = (simulate(probabilities, targets, costs, t) for t in (0.0, 1.0))
    assert cheapest.top_share == 0.0 and top.top_share == 1.0
    # Quality and cost still count every prompt, each on the tier it can go to.
    assert cheapest.quality == pytest.approx(np.mean([1, 0, 0, 1, 1, 1, 1, 0]))
    assert top.cost_usd == pytest.approx(np.mean([3, 3, 3, 3, 1, 1, 1, 3]))


def test_a_group_whose_top_tier_costs_nothing_has_no_saving_to_report() -> None:
    """Savings are a share of the top tier's cost: where it is zero (a free or self-hosted model logged at
    no cost) there is nothing to save a share of, which the report says with None rather than crashing."""
    from training.evaluate import score_group

    targets = np.array([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    probabilities = np.array([[0.2, 0.5, 0.9], [0.9, 0.9, 0.9], [0.1, 0.2, 0.8], [0.8, 0.3, 0.9]])
    free = score_group({"model": probabilities}, targets, np.zeros((4, 3)), ["s", "m", "l"])
    assert free["methods"]["model"]["savings_vs_top"] == {"95": None, "98": None, "99": None}
    priced = score_group({"model": probabilities}, targets, np.tile([1.0, 2.0, 4.0], (4, 1)), ["s", "m", "l"])
    # Relative scores (ratio rule) s/m: 0.18/0.36, 0.5/0.5, 0.11/0.2, 0.47/0.25. A threshold in (0.2, 0.36]
    # sends prompt 0 to m, 1 and 3 to s, 2 to l, all answered: (2 + 1 + 4 + 1) / 4 against 4.
    assert priced["methods"]["model"]["savings_vs_top"]["99"] == pytest.approx(1 - 2 / 4)
