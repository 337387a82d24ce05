"""Exploration: a share of classified requests answered by a tier drawn at random, with its propensity.

Outcomes reported back (serving.dispatch.outcomes) exist only for the tier that answered, and the
routing policy chooses that tier from the prompt: a cheap tier's head, retrained on them, would learn
only from the prompts the current model already thought easy. With `exploration_share` e > 0, each
classified request is, with probability e, sent to a tier drawn uniformly from the n tiers it may go
to (the tenant's tiers that can serve what it needs). While it is on, the decision log records, for
every classified request, the probability that its tier was chosen (`propensity`: (1 - e) if it is
the policy's tier, plus e / n) and whether the draw decided (`explored`). Explored answers are a
randomized experiment: training on them alone (`outcome_rows: explored` in the training config) is
unbiased; a caller's own tooling can weight the classified, unescalated rows by 1 / propensity instead
(the propensity is the routed tier's; training does not weight). Exploration costs quality or money on
purpose, so it is off unless configured.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Draw:
    tier: str
    propensity: float  # the probability that `tier` was chosen, given the policy's tier
    explored: bool  # the random draw chose the tier (it may equal the policy's)


def draw_tier(policy_tier: str, usable: Sequence[str], share: float, rng: random.Random) -> Draw:
    """The policy's tier, or with probability `share` one drawn uniformly from `usable` (which holds it)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if policy_tier not in usable:
        raise ValueError(f"the policy's tier {policy_tier!r} is not among the usable tiers {list(usable)}")
    explored = share > 0.0 and rng.random() < share
    tier = rng.choice(list(usable)) if explored else policy_tier
    propensity = (1.0 - share) * (tier == policy_tier) + share / len(usable)
    return Draw(tier, propensity, explored)
