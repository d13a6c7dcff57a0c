"""The learned gate of an LVLM stage (``cascade.stages[i].gate: learned``): P(the stage's answer is right).

A binary logistic regression on standardised features of an image known once the stage has answered
(CLIP's entropy and top-2 probabilities, the stage's p1, p2, margin and entropy of softmax(its candidate
scores), whether it agrees with CLIP's top-1, the position of its answer among its candidates; built by
:func:`cascadevlm.cascade.stages.stage_features`). Fitted by L-BFGS (scipy) with an analytic gradient,
minimising the mean log-loss + ``l2`` x ||w||^2 (the bias not penalised), as
:class:`cascadevlm.gating.routing.LearnedGate`. The stage's uncertainty is ``1 - P(right)``.

On the split it is fitted on, :func:`cross_fitted_uncertainty` gives each image the uncertainty of a
model fitted without it (k folds by image index), so a threshold search there is not fooled by the
in-sample fit. Pure numpy/scipy: same inputs, same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

#: The features, in column order (:func:`cascadevlm.cascade.stages.stage_features` builds them).
FEATURES = (
    "clip_entropy",
    "clip_p1",
    "clip_p2",
    "p1",
    "p2",
    "margin",
    "entropy",
    "agrees_with_clip",
    "position",
)
L2 = 1e-3  # the penalty of routing.LearnedGate
FOLDS = 5


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


@dataclass(frozen=True)
class StageGate:
    """A fitted learned gate: ``p_right(x) = sigmoid(((x - mean) / std) @ weight + bias)``."""

    mean: np.ndarray  # [F]
    std: np.ndarray  # [F]; a constant feature: 1 (its standardised column is 0)
    weight: np.ndarray  # [F]
    bias: float
    l2: float = L2

    @classmethod
    def fit(cls, features: np.ndarray, right: np.ndarray, l2: float = L2) -> StageGate:
        """Fit on rows of ``features`` [N, F] (finite) and ``right`` [N] (bool: the stage's answer is right)."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(right, dtype=np.float64)
        if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
            raise ValueError(
                f"a learned stage gate needs [N, F] features and N labels, got {x.shape}, {y.shape}"
            )
        if not np.isfinite(x).all():
            raise ValueError("a learned stage gate is fitted on finite features only (drop unanswered rows)")
        mean = x.mean(0)
        std = x.std(0)
        std = np.where(std > 0, std, 1.0)
        z = np.column_stack([(x - mean) / std, np.ones(len(x))])
        n, d = z.shape
        reg = np.ones(d)
        reg[-1] = 0.0  # no penalty on the bias

        def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
            t = z @ w
            loss = -(y * _log_sigmoid(t) + (1 - y) * _log_sigmoid(-t)).mean() + l2 * (reg * w**2).sum()
            p = np.exp(_log_sigmoid(t))
            grad = z.T @ (p - y) / n + 2 * l2 * reg * w
            return float(loss), grad

        res = minimize(
            loss_grad,
            np.zeros(d),
            jac=True,
            method="L-BFGS-B",
            options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 2000},
        )
        return cls(mean, std, res.x[:-1].copy(), float(res.x[-1]), float(l2))

    def p_right(self, features: np.ndarray) -> np.ndarray:
        """P(the stage's answer is right) per row; NaN where a feature is NaN (no scores)."""
        z = ((np.asarray(features, dtype=np.float64) - self.mean) / self.std) @ self.weight + self.bias
        with np.errstate(invalid="ignore"):  # NaN rows stay NaN
            return np.exp(_log_sigmoid(z))

    def uncertainty(self, features: np.ndarray) -> np.ndarray:
        """The stage's uncertainty: ``1 - P(right)`` (higher = less sure)."""
        return 1.0 - self.p_right(features)

    def to_dict(self) -> dict:
        """JSON-safe parameters (floats round-trip exactly through ``json``)."""
        return {
            "features": list(FEATURES),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "weight": [float(v) for v in self.weight],
            "bias": float(self.bias),
            "l2": float(self.l2),
        }

    @classmethod
    def from_dict(cls, d: dict) -> StageGate:
        if list(d.get("features", [])) != list(FEATURES):
            raise ValueError(
                f"a stored learned stage gate has features {d.get('features')}, expected {FEATURES}"
            )
        return cls(
            np.asarray(d["mean"], dtype=np.float64),
            np.asarray(d["std"], dtype=np.float64),
            np.asarray(d["weight"], dtype=np.float64),
            float(d["bias"]),
            float(d["l2"]),
        )


def folds_of(index: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """Each image's fold: its dataset index modulo ``folds`` (deterministic, independent of row order)."""
    return np.asarray(index, dtype=np.int64) % folds


def cross_fitted_uncertainty(
    features: np.ndarray, right: np.ndarray, index: np.ndarray, folds: int = FOLDS, l2: float = L2
) -> np.ndarray:
    """Each row's uncertainty from a gate fitted on the rows of the other folds (rows with a NaN feature:
    left out of every fit, NaN). A fold whose complement is empty or all one outcome is scored by the
    gate fitted on every usable row outside it all the same (its bias is then large, its order flat)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(right, dtype=bool)
    usable = np.isfinite(x).all(1)
    fold = folds_of(index, folds)
    out = np.full(len(x), np.nan)
    for f in range(folds):
        held = usable & (fold == f)
        train = usable & (fold != f)
        if not held.any():
            continue
        if not train.any():
            raise ValueError(
                f"cross-fitting a learned stage gate: fold {f} of {folds} holds every usable image; "
                "it needs images in at least two folds"
            )
        out[held] = StageGate.fit(x[train], y[train], l2).uncertainty(x[held])
    return out
