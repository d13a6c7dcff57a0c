"""The entropy gate: defer an image to the LVLM when CLIP's entropy exceeds tau (the one gate rule)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def defer_mask(entropies: Sequence[float], tau: float) -> np.ndarray:
    """True where entropy > tau. tau = +inf defers nothing; tau = -inf defers everything."""
    return np.asarray(entropies, dtype=np.float64) > tau


def tau_for_budget(entropies: Sequence[float], budget: float) -> float:
    """The smallest threshold that defers at most ``budget`` (a fraction in [0, 1]) of these images.

    Ties are never split: with many equal entropies the deferred fraction may be below the budget.
    """
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"deferral budget must be a fraction in [0, 1], got {budget}")
    e = np.sort(np.asarray(entropies, dtype=np.float64))[::-1]  # most uncertain first
    n = len(e)
    if n == 0:
        raise ValueError("cannot choose tau for a budget from an empty set of images")
    allowed = int(math.floor(budget * n + 1e-9))
    if allowed >= n:
        return -math.inf
    # Defer the `allowed` most uncertain images: tau = entropy of the first one kept (ties stay kept).
    return float(e[allowed])


def tau_grid(entropies: Sequence[float], points: int = 100) -> list[float]:
    """``points`` thresholds spanning the observed entropies, from +inf (CLIP only) to -inf (LVLM on all)."""
    e = np.asarray(entropies, dtype=np.float64)
    if len(e) == 0:
        return [math.inf, -math.inf]
    qs = np.quantile(e, np.linspace(1.0, 0.0, max(points - 2, 1)))
    return [math.inf, *sorted({float(q) for q in qs}, reverse=True), -math.inf]
