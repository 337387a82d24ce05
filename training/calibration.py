"""Per-tier temperature scaling fitted on validation data."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar


def _soft_nll(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    # log(1 + exp(z)) computed stably; BCE with soft targets.
    return float(np.mean(np.logaddexp(0.0, z) - targets * z))


def fit_temperatures(logits: np.ndarray, targets: np.ndarray) -> list[float]:
    """One temperature per tier minimising validation NLL over known outcomes (1.0 if none known)."""
    temperatures = []
    for k in range(logits.shape[1]):
        known = ~np.isnan(targets[:, k])
        if known.sum() < 2:
            temperatures.append(1.0)
            continue
        result = minimize_scalar(
            lambda log_t, k=k, known=known: _soft_nll(logits[known, k], targets[known, k], float(np.exp(log_t))),
            bounds=(np.log(0.05), np.log(20.0)),
            method="bounded",
        )
        temperatures.append(float(np.exp(result.x)))
    return temperatures


def apply_temperatures(logits: np.ndarray, temperatures: list[float]) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits / np.asarray(temperatures)))
