"""Routing beyond the paper's entropy gate, computed from prediction records alone.

Pure functions over arrays (calibration, gates, conformal candidate sets, score fusion) and
:func:`apply_routing`, which turns a run's test records (with the LVLM's answers) into final records
under a :class:`RoutingOptions`. Its defaults reproduce :func:`cascadevlm.cascade.evaluate.combine`
exactly: entropy gate, no calibration, fixed top-k, the LVLM's answer overrides CLIP.

Everything that is fitted (temperature, threshold for a budget, learned gate, conformal quantile,
fusion weight) is fitted on the validation records and applied unchanged to the test records.

Records-only approximation: the LVLM saw CLIP's fixed top-k. When a rule (a conformal set) shows
fewer candidates, the LVLM's choice among them is read from its per-candidate scores (the best-scored
candidate in the set), or, without scores, its answer when it lies in the set and CLIP's top-1
otherwise. A run that shows the LVLM the sets themselves can differ (prompts change with the list).

Records without full logits (above the CLIP stage's keep limit, e.g. 10,000 classes) are routed as a
:class:`TopkTail`: CLIP's stored top-k and one tail column for the other classes, each given an equal
share of the remaining mass. Memory is K + 1 numbers per image whatever the class count, and every
result equals that of the dense [N, C] rebuild it replaces (tests/test_routing_scale.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy.optimize import minimize, minimize_scalar
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from cascadevlm.gating.gate import tau_for_budget
from cascadevlm.records import PredictionRecord

GATES = ("entropy", "max_prob", "margin", "learned")
CANDIDATE_RULES = ("topk", "aps", "raps")
FUSION_GRID = tuple(float(w) for w in np.round(np.linspace(1.0, 0.0, 21), 2))  # LVLM weight, 1 = hard cascade


@dataclass
class RoutingOptions:
    """How the cascade routes an image and combines the two stages' answers.

    Args:
        gate: the uncertainty score an image is sent on: ``entropy`` (the paper's), ``max_prob``
            (1 - top-1 probability), ``margin`` (1 - (p1 - p2)), or ``learned`` (expected accuracy gain
            from sending, a logistic model fitted on validation records with LVLM answers).
        tau: threshold on the gate's score: images scoring above it are sent. +inf sends none.
        budget: instead of tau, send this fraction; the threshold is chosen on the validation records.
        calibration: ``temperature``: CLIP's logits divided by a temperature fitted on validation
            (negative log-likelihood) before the gate, the candidate sets and the fusion.
        candidates: ``topk`` shows CLIP's top-k; ``aps`` / ``raps``: split-conformal sets (calibrated on
            validation, target coverage 1 - alpha) capped at ``topk``; a one-class set is not sent.
        topk: candidates the LVLM was shown (the run's ``cascade.topk``); the cap of conformal sets.
        alpha: conformal miscoverage (target coverage 1 - alpha).
        raps_lambda, raps_k_reg: RAPS penalty per rank beyond ``raps_k_reg``; None (the default): tuned as
            RAPS's code does on ``raps_tune_fraction`` of the calibration records (k_reg: the (1 - alpha)
            quantile of the label's rank; lambda: the smallest mean set size over 0.001 ... 0.5), the
            quantile then calibrated on the others. Sets are not randomised (deterministic routing).
        fusion: ``logprob``: final = argmax over the candidates of (1 - w) * CLIP log-prob + w * the
            LVLM's log-softmaxed per-candidate scores (its answer as 0 / -1 where it has no scores)
            instead of the LVLM's answer overriding CLIP.
        fusion_weight: w; None = chosen on the validation records (accuracy on a grid, ties to the LVLM).
    """

    gate: Literal["entropy", "max_prob", "margin", "learned"] = "entropy"
    tau: float = math.inf
    budget: float | None = None
    calibration: Literal["none", "temperature"] = "none"
    candidates: Literal["topk", "aps", "raps"] = "topk"
    topk: int = 5
    alpha: float = 0.1
    raps_lambda: float | None = None
    raps_k_reg: int | None = None
    raps_tune_fraction: float = 0.3
    fusion: Literal["none", "logprob"] = "none"
    fusion_weight: float | None = None

    def validate(self) -> None:
        """One-line errors for options that cannot be honoured, before any work."""
        if self.gate not in GATES:
            raise ValueError(f"routing gate {self.gate!r} is unknown; choose one of {list(GATES)}")
        if self.calibration not in ("none", "temperature"):
            raise ValueError(f"calibration {self.calibration!r} is unknown; choose 'none' or 'temperature'")
        if self.candidates not in CANDIDATE_RULES:
            raise ValueError(
                f"candidate rule {self.candidates!r} is unknown; choose one of {list(CANDIDATE_RULES)}"
            )
        if self.fusion not in ("none", "logprob"):
            raise ValueError(f"fusion {self.fusion!r} is unknown; choose 'none' or 'logprob'")
        if self.budget is not None and not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"routing budget must be a fraction in [0, 1], got {self.budget}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"conformal alpha must be in (0, 1), got {self.alpha}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if (self.raps_lambda is not None and not self.raps_lambda >= 0) or (
            self.raps_k_reg is not None and self.raps_k_reg < 0
        ):
            raise ValueError(
                "raps_lambda and raps_k_reg must be >= 0 (or None: tuned on the calibration records), got "
                f"{self.raps_lambda}, {self.raps_k_reg}"
            )
        if not 0.0 < self.raps_tune_fraction < 1.0:
            raise ValueError(f"raps_tune_fraction must be in (0, 1), got {self.raps_tune_fraction}")
        if self.fusion_weight is not None and not 0.0 <= self.fusion_weight <= 1.0:
            raise ValueError(
                f"fusion_weight must be in [0, 1] (1 = the LVLM decides), got {self.fusion_weight}"
            )

    def is_paper_cascade(self) -> bool:
        """Entropy gate, raw probabilities, fixed top-k, LVLM overrides: ``combine`` alone does it."""
        return (self.gate, self.calibration, self.candidates, self.fusion) == (
            "entropy",
            "none",
            "topk",
            "none",
        )

    def needs_val_answers(self) -> bool:
        """Whether fitting needs the LVLM's answers on the validation images."""
        return self.gate == "learned" or (self.fusion == "logprob" and self.fusion_weight is None)

    def needs_val(self) -> bool:
        return (
            self.needs_val_answers()
            or self.budget is not None
            or self.calibration != "none"
            or self.candidates != "topk"
        )


# ------------------------------------------------------------------------------------------- arrays
@dataclass(frozen=True)
class TopkTail:
    """An [N, C] matrix kept in [N, K + 1] numbers: row i holds ``values[i, j]`` at class ``ids[i, j]``
    (j < K) and ``values[i, -1]`` at each of its ``count[i, -1]`` other classes (the tail).

    What :func:`record_arrays` gives for records without ``clip_logits`` (CLIP's top-k probabilities
    and the rest of the mass spread evenly over the other classes, as the dense rebuild did), so routing
    at 10,000 classes needs memory for K + 1 columns per image, not C. Every function of this module
    that takes CLIP's logits or log-probabilities accepts one and computes what it computes on the
    dense matrix, with the tail counted ``count`` times and ties between equal values ordered by
    class index (the dense code's stable argsort). Elementwise ufuncs (``np.exp``) act on ``values``.
    Padding columns (records with a shorter stored top-k) have id -1 and count 0.
    """

    values: np.ndarray  # [N, K + 1] float64; the last column is the tail's value
    ids: np.ndarray  # [N, K] int64 class ids of the stored columns, -1 = padding
    count: np.ndarray  # [N, K + 1] float64: 1 stored, 0 padding, C - (stored ids) the tail
    num_classes: int

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.values), self.num_classes)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, rows) -> TopkTail:
        """Rows only (a boolean mask or indices), as ``logits[rows]`` on the dense matrix."""
        return TopkTail(self.values[rows], self.ids[rows], self.count[rows], self.num_classes)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__" or kwargs or sum(isinstance(x, TopkTail) for x in inputs) != 1:
            return NotImplemented
        if any(not isinstance(x, TopkTail) and np.ndim(x) != 0 for x in inputs):
            return NotImplemented  # only scalars besides the matrix: the result is elementwise again
        return self.with_values(ufunc(*(x.values if isinstance(x, TopkTail) else x for x in inputs)))

    def with_values(self, values: np.ndarray) -> TopkTail:
        return TopkTail(values, self.ids, self.count, self.num_classes)

    def columns(self, classes: np.ndarray) -> np.ndarray:
        """Column of each class in ``classes`` ([N, L] ids): its stored column, else the tail's."""
        classes = np.asarray(classes)
        hit = self.ids[:, None, :] == classes[:, :, None]
        return np.where(hit.any(axis=2), hit.argmax(axis=2), self.values.shape[1] - 1)

    def take(self, classes: np.ndarray) -> np.ndarray:
        """The values at ``classes`` ([N, L] ids), as ``np.take_along_axis(dense, classes, 1)``."""
        return np.take_along_axis(self.values, self.columns(classes), axis=1)

    def to_dense(self) -> np.ndarray:
        """The [N, C] matrix (small C only: tests)."""
        out = np.repeat(self.values[:, -1:], self.num_classes, axis=1)
        rows, cols = np.nonzero(self.ids >= 0)
        out[rows, self.ids[rows, cols]] = self.values[rows, cols]
        return out


def _counted(x: TopkTail, values: np.ndarray, fill: float) -> np.ndarray:
    """``values`` where a column stands for at least one class, ``fill`` elsewhere."""
    return np.where(x.count > 0, values, fill)


def _row_sum(x: TopkTail, values: np.ndarray) -> np.ndarray:
    """Sum over each row's C classes of ``values`` (per column), each column counted ``count`` times."""
    return _counted(x, x.count * values, 0.0).sum(axis=1)


def _top_values(x: TopkTail, n: int) -> np.ndarray:
    """The n largest of each row's C values, descending: ``-np.sort(-dense, axis=1)[:, :n]``."""
    v = _counted(x, x.values, -np.inf)
    order = np.argsort(-v, axis=1, kind="stable")
    v, ends = (
        np.take_along_axis(v, order, axis=1),
        np.cumsum(np.take_along_axis(x.count, order, axis=1), axis=1),
    )
    rows = np.arange(len(v))
    return np.column_stack([v[rows, (ends <= r).sum(axis=1)] for r in range(n)]) if n else v[:, :0]


def _first_max(x: TopkTail, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row maximum, the smallest class index holding it): ``dense.max(1)``, ``dense.argmax(1)``."""
    v = _counted(x, values, -np.inf)
    best = v.max(axis=1)
    tied = v == best[:, None]
    stored = np.where(tied[:, :-1] & (x.ids >= 0), x.ids, np.iinfo(np.int64).max).min(axis=1)
    # the tail's smallest class: the first gap in the sorted stored ids
    ids = np.sort(np.where(x.ids >= 0, x.ids, np.iinfo(np.int64).max), axis=1)
    gap = ids != np.arange(ids.shape[1])
    tail_first = np.where(gap.any(axis=1), gap.argmax(axis=1), ids.shape[1])
    tail = np.where(tied[:, -1] & (x.count[:, -1] > 0), tail_first, np.iinfo(np.int64).max)
    return best, np.minimum(stored, tail)


def _label_rank(x: TopkTail, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each label in its row sorted descending, ties by class index (a stable argsort
    of ``-dense``): the classes with a larger value, and those with an equal value and a smaller index."""
    lv = x.take(labels[:, None])[:, 0]
    stored = x.count[:, :-1] > 0
    v, t, m = x.values[:, :-1], x.values[:, -1], x.count[:, -1]
    below = stored & (x.ids < labels[:, None])
    tail_below = labels - below.sum(axis=1)  # tail classes with a smaller index than the label
    greater = (stored & (v > lv[:, None])).sum(axis=1) + np.where(t > lv, m, 0)
    equal_before = (below & (v == lv[:, None])).sum(axis=1) + np.where((t == lv) & (m > 0), tail_below, 0)
    return (greater + equal_before).astype(np.int64)


def _rebuilt_log_probs(rec: PredictionRecord, num_classes: int) -> np.ndarray:
    """Log-probabilities from the stored top-k: exact for those classes, the rest of the mass spread
    evenly over the others (the records lack the full logits)."""
    p = np.asarray(rec.clip_topk_probs, dtype=np.float64)
    rest = max(1.0 - float(p.sum()), 0.0)
    others = num_classes - len(p)
    out = np.full(num_classes, math.log(max(rest / others, 1e-12)) if others > 0 else -30.0)
    out[rec.clip_topk] = np.log(np.maximum(p, 1e-12))
    return out


def _topk_tail_log_probs(records: Sequence[PredictionRecord], num_classes: int) -> TopkTail:
    """:func:`_rebuilt_log_probs` of every record as a :class:`TopkTail` (the same numbers)."""
    n, k = len(records), max(len(r.clip_topk_probs) for r in records)
    p = np.ones((n, k))  # padding columns (count 0) take the tail's value below
    ids = np.full((n, k), -1, dtype=np.int64)
    for i, r in enumerate(records):
        p[i, : len(r.clip_topk_probs)] = r.clip_topk_probs
        ids[i, : len(r.clip_topk)] = r.clip_topk
    stored = ids >= 0
    rest = np.maximum(1.0 - np.where(stored, p, 0.0).sum(axis=1), 0.0).tolist()
    others = num_classes - stored.sum(axis=1)
    # math.log as the dense rebuild takes it (np.log may differ in the last bit: ties must stay ties)
    tail = np.array(
        [math.log(max(r / o, 1e-12)) if o > 0 else -30.0 for r, o in zip(rest, others.tolist(), strict=True)]
    )
    values = np.column_stack([np.where(stored, np.log(np.maximum(p, 1e-12)), tail[:, None]), tail])
    count = np.column_stack([stored.astype(np.float64), others.astype(np.float64)])
    return TopkTail(values, ids, count, num_classes)


@dataclass
class RecordArrays:
    """The numbers of a list of records as arrays (one row per record)."""

    label: np.ndarray  # [N] int, -1 unknown
    clip_pred: np.ndarray  # [N] int
    entropy: np.ndarray  # [N] stored entropy (nats) of CLIP's uncalibrated distribution
    # [N, C] CLIP logits; where no record has them (C above the records' keep limit), a TopkTail of
    # log-probs rebuilt from the stored top-k (rows with and without logits: rebuilt rows, dense)
    logits: np.ndarray | TopkTail
    exact_logits: bool  # False: some rows were rebuilt from the stored top-k probabilities
    topk: np.ndarray  # [N, K] CLIP's top-k class ids (K = shortest stored list)
    lvlm_choice: np.ndarray  # [N] int, -1 where the LVLM was not asked
    lvlm_scores: np.ndarray  # [N, K] per-candidate scores, NaN where absent

    def __len__(self) -> int:
        return len(self.label)

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    @property
    def has_answers(self) -> np.ndarray:
        return self.lvlm_choice >= 0


def record_arrays(records: Sequence[PredictionRecord], num_classes: int | None = None) -> RecordArrays:
    """Arrays from records; ``num_classes`` defaults to the length of the stored logits."""
    if not records:
        raise ValueError("no records to route")
    if num_classes is None:
        with_logits = [r for r in records if r.clip_logits is not None]
        num_classes = (
            len(with_logits[0].clip_logits) if with_logits else 1 + max(max(r.clip_topk) for r in records)
        )
    n = len(records)
    k = min(len(r.clip_topk) for r in records)
    exact = all(r.clip_logits is not None and len(r.clip_logits) == num_classes for r in records)
    if exact:  # the common case, in one conversion
        logits = np.array([r.clip_logits for r in records], dtype=np.float64)
    elif all(r.clip_logits is None for r in records):  # bounded memory at any class count
        logits = _topk_tail_log_probs(records, num_classes)
    else:
        logits = np.empty((n, num_classes))
        for i, r in enumerate(records):
            if r.clip_logits is not None:
                if len(r.clip_logits) != num_classes:
                    raise ValueError(
                        f"image {r.index} has {len(r.clip_logits)} logits for {num_classes} classes"
                    )
                logits[i] = r.clip_logits
            else:
                logits[i] = _rebuilt_log_probs(r, num_classes)
    if all(r.lvlm_scores is not None and len(r.lvlm_scores) >= k for r in records):
        scores = np.array([r.lvlm_scores[:k] for r in records], dtype=np.float64)
    else:
        scores = np.full((n, k), np.nan)
        for i, r in enumerate(records):
            if r.lvlm_scores is not None:
                s = r.lvlm_scores[:k]
                scores[i, : len(s)] = s
    return RecordArrays(
        label=np.array([r.label for r in records], dtype=np.int64),
        clip_pred=np.array([r.clip_pred for r in records], dtype=np.int64),
        entropy=np.array([r.entropy for r in records], dtype=np.float64),
        logits=logits,
        exact_logits=exact,
        topk=np.array([r.clip_topk[:k] for r in records], dtype=np.int64),
        lvlm_choice=np.array(
            [-1 if r.lvlm_choice is None else r.lvlm_choice for r in records], dtype=np.int64
        ),
        lvlm_scores=scores,
    )


# -------------------------------------------------------------------------------------- calibration
def log_softmax(logits: np.ndarray | TopkTail, temperature: float = 1.0) -> np.ndarray | TopkTail:
    if isinstance(logits, TopkTail):  # the tail's classes counted as many times as they are
        z = logits.values / temperature
        z = z - _counted(logits, z, -np.inf).max(axis=1, keepdims=True)
        return logits.with_values(z - np.log(_row_sum(logits, np.exp(z)))[:, None])
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray | TopkTail, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    if isinstance(logits, TopkTail):
        return float(-log_softmax(logits, temperature).take(np.asarray(labels)[:, None]).mean())
    return float(-log_softmax(logits, temperature)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray | TopkTail, labels: np.ndarray) -> float:
    """The temperature minimising the validation NLL; top-1 never changes.

    The NLL is convex in 1/T (log-sum-exp of a linear function minus a linear term), so a bounded
    scalar search over 1/T in [0.01, 100] finds the global minimum.
    """
    if len(labels) == 0:
        raise ValueError("temperature scaling needs labelled validation records")
    res = minimize_scalar(
        lambda beta: nll(logits, labels, 1.0 / beta),
        bounds=(0.01, 100.0),
        method="bounded",
        options={"xatol": 1e-7},
    )
    t = 1.0 / float(res.x)
    return t if math.isfinite(t) and t > 0 else 1.0


def expected_calibration_error(probs: np.ndarray | TopkTail, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE (L1, equal-width confidence bins), torchmetrics' definition."""
    if isinstance(probs, TopkTail):  # torchmetrics' top-label confidences and hits, on the compact rows
        conf, pred = _first_max(probs, probs.values.astype(np.float32))  # float32 as torchmetrics sees it
        return float(
            binary_calibration_error(
                torch.as_tensor(conf), torch.as_tensor(pred == np.asarray(labels), dtype=torch.long),
                n_bins=n_bins, norm="l1",
            )
        )  # fmt: skip
    return float(
        multiclass_calibration_error(
            torch.as_tensor(probs, dtype=torch.float32),
            torch.as_tensor(labels, dtype=torch.long),
            num_classes=probs.shape[1],
            n_bins=n_bins,
            norm="l1",
        )
    )


def reliability_bins(probs: np.ndarray | TopkTail, labels: np.ndarray, n_bins: int = 15) -> dict:
    """Per equal-width confidence bin: count, mean confidence and accuracy (a reliability diagram)."""
    if isinstance(probs, TopkTail):
        conf, pred = _first_max(probs, probs.values)
        correct = (pred == labels).astype(np.float64)
    else:
        conf = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)  # (lo, hi] bins
    count = np.bincount(b, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {
        "edges": edges.tolist(),
        "count": count.tolist(),
        "confidence": (np.bincount(b, conf, n_bins) / safe).tolist(),
        "accuracy": (np.bincount(b, correct, n_bins) / safe).tolist(),
    }


# -------------------------------------------------------------------------------------------- gates
def entropy_of(logp: np.ndarray | TopkTail) -> np.ndarray:
    """Entropy per row of log-probabilities; a class of probability 0 (log-probability -inf) adds 0."""
    if isinstance(logp, TopkTail):
        return -_row_sum(logp, _p_log_p(logp.values))
    return -_p_log_p(logp).sum(axis=1)


def _p_log_p(logp: np.ndarray) -> np.ndarray:
    """p log p from log p, 0 where p = 0 (0 * -inf is NaN in floating point)."""
    with np.errstate(invalid="ignore"):
        return np.where(np.isneginf(logp), 0.0, np.exp(logp) * logp)


def gate_score(gate: str, logp: np.ndarray | TopkTail) -> np.ndarray:
    """Uncertainty per image (higher = send first) for the rule-based gates."""
    if gate == "entropy":
        return entropy_of(logp)
    if isinstance(logp, TopkTail):
        top2 = _top_values(logp, min(2, logp.shape[1]))
    else:
        top2 = -np.sort(-logp, axis=1)[:, :2]
    if gate == "max_prob":
        return 1.0 - np.exp(top2[:, 0])
    if gate == "margin":
        p2 = np.exp(top2[:, 1]) if logp.shape[1] > 1 else 0.0
        return 1.0 - (np.exp(top2[:, 0]) - p2)
    raise ValueError(f"gate {gate!r} has no closed-form score; choose one of entropy, max_prob, margin")


def gate_features(logp: np.ndarray | TopkTail) -> np.ndarray:
    """What the learned gate sees of CLIP's distribution (all known before the LVLM is asked)."""
    if isinstance(logp, TopkTail):  # the five largest are all it reads of the sorted row
        p = np.exp(_top_values(logp, min(5, logp.shape[1])))
    else:
        p = np.exp(-np.sort(-logp, axis=1))
    k = min(5, p.shape[1])
    p1 = p[:, 0]
    p2 = p[:, 1] if p.shape[1] > 1 else np.zeros_like(p1)
    ent = entropy_of(logp)
    return np.column_stack(
        [
            ent,
            ent**2,
            p1,
            p2,
            p1 - p2,
            np.log(p1 + 1e-12),
            np.log(p1 - p2 + 1e-6),
            p[:, :k].sum(1),
            p[:, :3].sum(1),
        ]
    )


@dataclass
class LearnedGate:
    """Multinomial logistic regression over {LVLM breaks it, no change, LVLM fixes it}; its score is
    the expected accuracy gain of sending, P(fix) - P(break). Fitted by L-BFGS (scipy) with an analytic
    gradient on standardised features."""

    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray  # [F, 3]
    bias: np.ndarray  # [3]

    @classmethod
    def fit(cls, features: np.ndarray, gain: np.ndarray, l2: float = 1e-3) -> LearnedGate:
        if len(gain) == 0:
            raise ValueError("the learned gate needs validation records with LVLM answers")
        mean, std = features.mean(0), features.std(0) + 1e-9
        x = np.column_stack([(features - mean) / std, np.ones(len(features))])
        y = np.eye(3)[np.asarray(gain) + 1]  # -1/0/1 -> one-hot over 3 outcomes
        n, d = x.shape
        reg = np.ones((d, 1))
        reg[-1] = 0.0  # no penalty on the bias

        def loss_grad(flat):
            w = flat.reshape(d, 3)
            z = x @ w
            z -= z.max(1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(1, keepdims=True))
            loss = -(y * logp).sum() / n + l2 * (reg * w**2).sum()
            grad = x.T @ (np.exp(logp) - y) / n + 2 * l2 * reg * w
            return loss, grad.ravel()

        res = minimize(loss_grad, np.zeros(d * 3), jac=True, method="L-BFGS-B")
        w = res.x.reshape(d, 3)
        return cls(mean, std, w[:-1], w[-1])

    def score(self, features: np.ndarray) -> np.ndarray:
        z = ((features - self.mean) / self.std) @ self.weight + self.bias
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return p[:, 2] - p[:, 0]


def oracle_score(clip_correct: np.ndarray, sent_correct: np.ndarray) -> np.ndarray:
    """The oracle gate's order: images the LVLM fixes first, those it breaks last (reads the labels)."""
    return sent_correct.astype(np.float64) - clip_correct.astype(np.float64)


def accuracy_curve(
    score: np.ndarray, clip_correct: np.ndarray, sent_correct: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy when the m highest-scoring images are sent, for m = 0..N (ties in index order).

    Returns (fraction sent [N+1], accuracy [N+1]).
    """
    n = len(score)
    order = np.argsort(-score, kind="stable")
    gain = (sent_correct.astype(np.int64) - clip_correct.astype(np.int64))[order]
    acc = (clip_correct.sum() + np.concatenate([[0], np.cumsum(gain)])) / max(n, 1)
    return np.arange(n + 1) / max(n, 1), acc


def accuracy_at_budget(fraction: np.ndarray, acc: np.ndarray, budget: float) -> float:
    """Accuracy with floor(budget * N) images sent."""
    n = len(acc) - 1
    return float(acc[int(math.floor(budget * n + 1e-9))])


def curve_area(fraction: np.ndarray, acc: np.ndarray) -> float:
    """Area under accuracy vs fraction sent (trapezoids over [0, 1]): the mean accuracy over budgets."""
    return float(np.sum((acc[1:] + acc[:-1]) * np.diff(fraction)) / 2.0)


# -------------------------------------------------------------------------------- conformal sets
def _sorted_probs(logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-logp, axis=1, kind="stable")
    return order, np.exp(np.take_along_axis(logp, order, axis=1))


def _runs(logp: TopkTail) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each row's C probabilities sorted descending, as runs of equal values (a stored class: a run of
    one; the tail: a run of ``count``): (probability, length, 0-based rank of the run's first class,
    the mass ranked before the run) [N, K + 1] each. Equal values may run in any order: the
    cumulative mass at each rank is the same."""
    v = _counted(logp, logp.values, -np.inf)
    order = np.argsort(-v, axis=1, kind="stable")
    p = np.exp(np.take_along_axis(v, order, axis=1))
    length = np.take_along_axis(logp.count, order, axis=1)
    start = np.cumsum(length, axis=1) - length
    before = np.concatenate([np.zeros((len(p), 1)), np.cumsum(length * p, axis=1)[:, :-1]], axis=1)
    return p, length, start, before


def _run_cum(p, start, before, t, method: str, lam: float, k_reg: int) -> np.ndarray:
    """The penalised cumulative mass at the t-th (1-based) class of a run: a run of one adds as
    ``np.cumsum`` does; a run of m equal values at once."""
    cum = before + t * p
    if method == "raps":
        cum = cum + lam * np.maximum(0, start + t - k_reg)
    elif method != "aps":
        raise ValueError(f"conformal method {method!r} is unknown; choose 'aps' or 'raps'")
    return cum


def _tail_set_sizes(logp: TopkTail, qhat: float, method: str, lam: float, k_reg: int) -> np.ndarray:
    """How many ranks have a penalised cumulative mass <= qhat + 1e-12 (a prefix: the mass grows with
    the rank), counted run by run: within a run of m, the largest t with before + t p (+ penalty) <= q,
    from the closed form and checked against the sum itself."""
    q = qhat + 1e-12
    p, length, start, before = _runs(logp)
    raps = method == "raps"
    total = np.zeros(len(p), dtype=np.int64)

    def most(num, den):  # the largest t with t * den <= num (den 0: every t or none)
        return np.where(den > 0, np.floor(num / den), np.where(num >= 0, np.inf, -np.inf))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for j in range(p.shape[1]):
            pj, mj, sj, bj = p[:, j], length[:, j], start[:, j], before[:, j]
            room = q - bj
            t = most(room, pj)  # ranks before RAPS's penalty starts (all, for APS)
            if raps:
                free = np.maximum(k_reg - sj, 0)
                t = np.where(t < free, t, np.maximum(free, most(room + lam * (k_reg - sj), pj + lam)))
            t = np.clip(np.nan_to_num(t, nan=0.0), 0, mj)
            t = t - ((t >= 1) & (_run_cum(pj, sj, bj, t, method, lam, k_reg) > q))
            t = t + ((t + 1 <= mj) & (_run_cum(pj, sj, bj, t + 1, method, lam, k_reg) <= q))
            total += t.astype(np.int64)
    return total


def _tail_label_scores(logp: TopkTail, labels: np.ndarray, method: str, lam: float, k_reg: int) -> np.ndarray:
    """The conformal score of each label: the penalised cumulative mass at its rank."""
    rank = _label_rank(logp, labels)
    p, length, start, before = _runs(logp)
    j = (np.cumsum(length, axis=1) <= rank[:, None]).sum(axis=1)[:, None]
    pick = [np.take_along_axis(x, j, axis=1)[:, 0] for x in (p, start, before)]
    return _run_cum(pick[0], pick[1], pick[2], rank - pick[1] + 1, method, lam, k_reg)


def _penalised_cumsum(p_sorted: np.ndarray, method: str, lam: float, k_reg: int) -> np.ndarray:
    cum = np.cumsum(p_sorted, axis=1)
    if method == "raps":
        ranks = np.arange(1, p_sorted.shape[1] + 1)
        cum = cum + lam * np.maximum(0, ranks - k_reg)
    elif method != "aps":
        raise ValueError(f"conformal method {method!r} is unknown; choose 'aps' or 'raps'")
    return cum


def conformal_quantile(
    logp: np.ndarray | TopkTail,
    labels: np.ndarray,
    alpha: float,
    method: str = "aps",
    lam: float = 0.05,
    k_reg: int = 2,
) -> float:
    """Split-conformal threshold from calibration images: the k-th smallest, k = ceil((n+1)(1-alpha)), of the
    (non-randomised) APS / RAPS score, the mass of the classes ranked up to and including the label."""
    n = len(labels)
    if n == 0:
        raise ValueError("conformal sets need labelled validation records")
    if isinstance(logp, TopkTail):
        scores = _tail_label_scores(logp, labels, method, lam, k_reg)
    else:
        order, p_sorted = _sorted_probs(logp)
        cum = _penalised_cumsum(p_sorted, method, lam, k_reg)
        rank = np.argmax(order == labels[:, None], axis=1)
        scores = cum[np.arange(n), rank]
    # the k-th smallest score (1-based), as split conformal prescribes
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if k > n:
        return math.inf  # too few calibration images for this alpha: every class
    return float(np.sort(scores)[k - 1])


def conformal_set_sizes(
    logp: np.ndarray | TopkTail,
    qhat: float,
    method: str = "aps",
    lam: float = 0.05,
    k_reg: int = 2,
    cap: int | None = None,
) -> np.ndarray:
    """Size of each image's set: the classes in CLIP's order whose score is <= qhat (at least one,
    at most ``cap``). Sets are prefixes of CLIP's ranking, so a size says which classes are in it."""
    if isinstance(logp, TopkTail):
        sizes = np.maximum(_tail_set_sizes(logp, qhat, method, lam, k_reg), 1)
    else:
        _, p_sorted = _sorted_probs(logp)
        cum = _penalised_cumsum(p_sorted, method, lam, k_reg)
        sizes = np.maximum((cum <= qhat + 1e-12).sum(axis=1), 1)
    return np.minimum(sizes, cap) if cap is not None else sizes


RAPS_LAMBDAS = (0.001, 0.01, 0.1, 0.2, 0.5)  # the official code's pick_lamda_size grid


def tune_raps(logp: np.ndarray | TopkTail, labels: np.ndarray, alpha: float) -> tuple[float, int]:
    """(lambda, k_reg) as RAPS's code picks them on its tuning records: k_reg the (1 - alpha) quantile
    ('higher') of the label's 1-based rank; lambda the grid value whose sets, calibrated and measured on
    the same records, are smallest on average (ties to the first)."""
    if isinstance(logp, TopkTail):
        ranks = _label_rank(logp, labels)
    else:
        order = np.argsort(-logp, axis=1, kind="stable")
        ranks = np.argmax(order == labels[:, None], axis=1)
    k_reg = int(np.quantile(ranks, 1 - alpha, method="higher")) + 1
    best = (math.inf, RAPS_LAMBDAS[0])
    for lam in RAPS_LAMBDAS:
        qhat = conformal_quantile(logp, labels, alpha, "raps", lam, k_reg)
        size = float(conformal_set_sizes(logp, qhat, "raps", lam, k_reg).mean())
        if size < best[0]:
            best = (size, lam)
    return best[1], k_reg


def fit_raps_penalty(
    logp: np.ndarray | TopkTail,
    labels: np.ndarray,
    rows: np.ndarray,
    options: RoutingOptions,
    notes: list[str],
) -> tuple[tuple[float, int], np.ndarray]:
    """RAPS's (lambda, k_reg) and the calibration rows left for the quantile: the given values and every
    row, or values tuned on a seeded ``raps_tune_fraction`` of ``rows`` and the other rows."""
    if options.raps_lambda is not None and options.raps_k_reg is not None:
        return (float(options.raps_lambda), int(options.raps_k_reg)), rows
    perm = np.random.default_rng(0).permutation(rows)
    n_tune = max(1, math.floor(options.raps_tune_fraction * len(perm)))
    if len(perm) - n_tune < 1:
        raise ValueError(
            "RAPS tunes lambda and k_reg on part of the calibration records and needs the rest for the "
            f"quantile: {len(perm)} labelled validation records are too few; give raps_lambda and raps_k_reg"
        )
    tune, cal = np.sort(perm[:n_tune]), np.sort(perm[n_tune:])
    lam, k_reg = tune_raps(logp[tune], labels[tune], options.alpha)
    lam = float(options.raps_lambda) if options.raps_lambda is not None else lam
    k_reg = int(options.raps_k_reg) if options.raps_k_reg is not None else k_reg
    notes.append(
        f"raps: lambda {lam:g}, k_reg {k_reg} tuned on {len(tune)} calibration records; quantile on {len(cal)}"
    )
    return (lam, k_reg), cal


def set_coverage(logp: np.ndarray | TopkTail, labels: np.ndarray, sizes: np.ndarray) -> float:
    """Fraction of images whose label is among the first ``sizes`` classes of CLIP's ranking."""
    if isinstance(logp, TopkTail):
        rank = _label_rank(logp, labels)
    else:
        order = np.argsort(-logp, axis=1, kind="stable")
        rank = np.argmax(order == labels[:, None], axis=1)
    return float((rank < sizes).mean())


# ---------------------------------------------------------------------------------- LVLM outcome
def restricted_choice(a: RecordArrays, sizes: np.ndarray, full: int) -> np.ndarray:
    """The LVLM's choice among the first ``sizes`` candidates (records-only; see the module note).

    Where a set holds all ``full`` candidates it was shown, its answer as recorded."""
    out = np.where(a.has_answers, a.lvlm_choice, a.clip_pred)
    k = a.topk.shape[1]
    cols = np.arange(k)
    in_set = cols[None, :] < np.minimum(sizes, k)[:, None]
    masked = np.where(in_set & ~np.isnan(a.lvlm_scores), a.lvlm_scores, -np.inf)
    best = a.topk[np.arange(len(a)), masked.argmax(axis=1)]
    has_scores = np.isfinite(masked).any(axis=1)
    rank = np.argmax(a.topk == a.lvlm_choice[:, None], axis=1)
    choice_in = (a.topk == a.lvlm_choice[:, None]).any(axis=1) & (rank < sizes)
    # the recorded answer stands where the set holds every candidate shown and that answer
    smaller = a.has_answers & ~((sizes >= full) & choice_in)
    out = np.where(smaller & has_scores, best, out)
    out = np.where(smaller & ~has_scores & ~choice_in, a.topk[:, 0], out)
    return out


def fused_choice(
    a: RecordArrays, clip_logp: np.ndarray | TopkTail, sizes: np.ndarray, weight: float
) -> np.ndarray:
    """argmax over each image's candidates of (1 - w) * CLIP log-prob + w * LVLM log-softmax(scores);
    an LVLM without scores counts as 0 for its answer and -1 for the other candidates."""
    n, k = a.topk.shape
    cols = np.arange(k)
    in_set = cols[None, :] < np.minimum(sizes, k)[:, None]
    if isinstance(clip_logp, TopkTail):
        clip_c = clip_logp.take(a.topk)
    else:
        clip_c = np.take_along_axis(clip_logp, a.topk, axis=1)
    s = np.where(in_set, a.lvlm_scores, np.nan)
    has_scores = ~np.isnan(s).all(axis=1)
    s_max = np.nanmax(np.where(has_scores[:, None], s, 0.0), axis=1, keepdims=True)
    z = np.where(in_set & ~np.isnan(s), s - s_max, -np.inf)
    lse = np.log(np.exp(z).sum(axis=1, keepdims=True).clip(min=1e-300))
    lvlm_ls = np.where(has_scores[:, None], z - lse, (a.topk == a.lvlm_choice[:, None]) - 1.0)
    lvlm_ls = np.where(
        np.isfinite(lvlm_ls), lvlm_ls, -1e9
    )  # a candidate without a score: finite, so w = 0 works
    fused = np.where(in_set, (1.0 - weight) * clip_c + weight * lvlm_ls, -np.inf)
    pick = a.topk[np.arange(n), fused.argmax(axis=1)]
    return np.where(a.has_answers, pick, a.clip_pred)


def choose_fusion_weight(
    a: RecordArrays, clip_logp: np.ndarray | TopkTail, sizes: np.ndarray, grid: Sequence[float] = FUSION_GRID
) -> float:
    """The LVLM weight with the best validation accuracy over images with answers (first best in
    ``grid``, which starts at 1: ties go to the hard cascade)."""
    keep = a.has_answers & (a.label >= 0)
    if not keep.any():
        raise ValueError("choosing the fusion weight needs validation records with LVLM answers")
    accs = [float((fused_choice(a, clip_logp, sizes, w)[keep] == a.label[keep]).mean()) for w in grid]
    return float(grid[int(np.argmax(accs))])


# ------------------------------------------------------------------------------------ the router
def _clone(rec: PredictionRecord) -> PredictionRecord:
    """A shallow copy, as ``copy.copy`` makes it but ~10x faster (10,000 records per setting)."""
    out = object.__new__(PredictionRecord)
    out.__dict__.update(rec.__dict__)
    return out


@dataclass
class FittedRouting:
    """Everything fitted on validation records; :meth:`decide` and :meth:`finalize` apply it."""

    options: RoutingOptions
    num_classes: int
    temperature: float = 1.0
    threshold: float = math.inf
    threshold_source: str = "config"
    learned: LearnedGate | None = None
    qhat: float | None = None
    raps: tuple[float, int] = (0.05, 2)  # (lambda, k_reg) of RAPS scores: given, or tuned in fit_routing
    fusion_weight: float | None = None
    notes: list[str] = field(default_factory=list)

    # -- per image
    def log_probs(self, a: RecordArrays) -> np.ndarray:
        return log_softmax(a.logits, self.temperature)

    def scores(self, a: RecordArrays, logp: np.ndarray) -> np.ndarray:
        o = self.options
        if o.gate == "entropy" and o.calibration == "none":
            return a.entropy  # the stored entropy: bit for bit what today's gate reads
        if o.gate == "learned":
            return self.learned.score(gate_features(logp))
        return gate_score(o.gate, logp)

    def set_sizes(self, logp: np.ndarray) -> np.ndarray:
        o = self.options
        if o.candidates == "topk":
            return np.full(len(logp), o.topk)
        return conformal_set_sizes(logp, self.qhat, o.candidates, *self.raps, cap=o.topk)

    def decide(self, records: Sequence[PredictionRecord]) -> tuple[np.ndarray, np.ndarray]:
        """(sent to the LVLM [N] bool, candidates shown [N] int) for these records (before the LVLM)."""
        a = record_arrays(records, self.num_classes)
        return self._decide(a)

    def _decide(self, a: RecordArrays):
        logp = self.log_probs(a)
        sizes = self.set_sizes(logp)
        sent = self.scores(a, logp) > self.threshold
        if self.options.candidates != "topk":
            sent &= sizes > 1  # a one-class conformal set is settled: CLIP's answer stands
        return sent, sizes

    def finalize(self, records: Sequence[PredictionRecord]) -> tuple[list[PredictionRecord], dict]:
        a = record_arrays(records, self.num_classes)
        shown = max((len(r.lvlm_scores) for r in records if r.lvlm_scores is not None), default=0)
        if shown > self.options.topk:
            raise ValueError(
                f"the LVLM was shown {shown} candidates but routing topk is {self.options.topk}; "
                "set topk to the run's cascade.topk"
            )
        sent, sizes = self._decide(a)
        missing = sent & ~a.has_answers
        if missing.any():
            idx = records[int(np.argmax(missing))].index
            raise RuntimeError(f"image {idx} was deferred but has no LVLM answer")
        o = self.options
        if o.fusion == "logprob":
            lvlm = fused_choice(a, self.log_probs(a), sizes, self.fusion_weight)
        else:
            lvlm = restricted_choice(a, sizes, o.topk)
        out = []
        for r, s, c in zip(records, sent, lvlm, strict=True):
            r = _clone(r)
            r.deferred = bool(s)
            if s:
                # the hard cascade with top-k keeps the recorded answer object as it is
                r.final = r.lvlm_choice if (o.fusion == "none" and o.candidates == "topk") else int(c)
            else:
                r.final = r.clip_pred
            out.append(r)
        return out, self.info(sent, sizes)

    def info(self, sent: np.ndarray, sizes: np.ndarray) -> dict:
        o = self.options
        info = {
            "gate": o.gate,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "calibration": o.calibration,
            "temperature": self.temperature,
            "candidates": o.candidates,
            "fusion": o.fusion,
            "deferral": float(sent.mean()) if len(sent) else 0.0,
            "notes": list(self.notes),
        }
        if o.candidates != "topk":
            info.update(alpha=o.alpha, qhat=self.qhat, mean_set_size=float(sizes.mean()), cap=o.topk)
            if o.candidates == "raps":
                info.update(raps_lambda=self.raps[0], raps_k_reg=self.raps[1])
        if o.fusion != "none":
            info["fusion_weight"] = self.fusion_weight
        return info


def sent_outcome(a: RecordArrays, sizes: np.ndarray, topk: int) -> np.ndarray:
    """The hard cascade's answer for each image if it were sent (the LVLM's, restricted to the set)."""
    return restricted_choice(a, sizes, topk)


def fit_routing(
    val_records: Sequence[PredictionRecord] | None,
    options: RoutingOptions,
    num_classes: int | None = None,
) -> FittedRouting:
    """Fit temperature, conformal quantile, learned gate, threshold and fusion weight on validation."""
    options.validate()
    if options.needs_val() and not val_records:
        raise ValueError(
            "these routing options are fitted on validation records; give them (evaluate on the "
            "validation split, or cascade.budget_split) or use gate=entropy, calibration=none, "
            "candidates=topk, fusion=none with a fixed tau"
        )
    fit = FittedRouting(options, num_classes or 0, threshold=options.tau, fusion_weight=options.fusion_weight)
    if not options.needs_val():
        if num_classes is None:
            fit.num_classes = 0  # resolved from the test records in apply_routing
        return fit
    v = record_arrays(val_records, num_classes)
    fit.num_classes = v.num_classes
    lab = v.label >= 0
    if not v.exact_logits and (options.calibration != "none" or options.candidates != "topk"):
        fit.notes.append(
            "records lack clip_logits: probabilities beyond CLIP's stored top-k are approximated"
        )
    if options.calibration == "temperature":
        fit.temperature = fit_temperature(v.logits[lab], v.label[lab])
    logp = fit.log_probs(v)
    if options.candidates != "topk":
        cal = np.flatnonzero(lab)
        if options.candidates == "raps":
            fit.raps, cal = fit_raps_penalty(logp, v.label, cal, options, fit.notes)
        fit.qhat = conformal_quantile(logp[cal], v.label[cal], options.alpha, options.candidates, *fit.raps)
    sizes = fit.set_sizes(logp)
    if options.needs_val_answers():
        ans = v.has_answers & lab
        if not ans.any():
            raise ValueError(
                "gate=learned and a fitted fusion weight need the LVLM's answers on the validation "
                "images (run the validation split with cascade.lvlm_on: all)"
            )
        if options.fusion == "logprob" and options.fusion_weight is None:
            fit.fusion_weight = choose_fusion_weight(v, logp, sizes)
        if options.gate == "learned":
            sent_pred = (
                fused_choice(v, logp, sizes, fit.fusion_weight)
                if options.fusion == "logprob"
                else sent_outcome(v, sizes, options.topk)
            )
            gain = (sent_pred == v.label).astype(int) - (v.clip_pred == v.label).astype(int)
            fit.learned = LearnedGate.fit(gate_features(logp)[ans], gain[ans])
    if options.budget is not None:
        fit.threshold = tau_for_budget(fit.scores(v, logp), options.budget)
        fit.threshold_source = f"budget {options.budget} on validation"
    return fit


def apply_routing(
    test_records: Sequence[PredictionRecord],
    val_records: Sequence[PredictionRecord] | None,
    options: RoutingOptions,
    num_classes: int | None = None,
) -> tuple[list[PredictionRecord], dict]:
    """Final records of the cascade under ``options`` (fitted on ``val_records``), and what was fitted.

    ``test_records`` carry the LVLM's answers (``combine``'s output); every image the routing sends
    must have one. With the defaults this equals ``combine`` exactly.
    """
    fit = fit_routing(val_records, options, num_classes)
    if not fit.num_classes:
        fit.num_classes = record_arrays(test_records, num_classes).num_classes
    return fit.finalize(test_records)


__all__ = [
    "FittedRouting",
    "LearnedGate",
    "RecordArrays",
    "RoutingOptions",
    "TopkTail",
    "accuracy_at_budget",
    "accuracy_curve",
    "apply_routing",
    "choose_fusion_weight",
    "conformal_quantile",
    "conformal_set_sizes",
    "curve_area",
    "expected_calibration_error",
    "fit_routing",
    "fit_temperature",
    "fused_choice",
    "gate_features",
    "gate_score",
    "log_softmax",
    "nll",
    "oracle_score",
    "record_arrays",
    "reliability_bins",
    "restricted_choice",
    "set_coverage",
]
