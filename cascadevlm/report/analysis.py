"""Analyses of a cascade run computed from its records alone (no model is re-run)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from cascadevlm.gating.gate import defer_mask, tau_grid
from cascadevlm.records import PredictionRecord
from cascadevlm.report.metrics import accuracy


def final_at_tau(records: Sequence[PredictionRecord], tau: float) -> list[int]:
    """The cascade's predictions had the gate used ``tau``: the LVLM's choice where entropy > tau.

    Needs the LVLM's answer for every image that ``tau`` defers; raises when one is missing.
    """
    mask = defer_mask([r.entropy for r in records], tau)
    out = []
    for r, d in zip(records, mask, strict=True):
        if d:
            if r.lvlm_choice is None:
                raise ValueError(f"image {r.index} would be deferred at tau={tau} but has no LVLM answer")
            out.append(r.lvlm_choice)
        else:
            out.append(r.clip_pred)
    return out


def answerable_taus(records: Sequence[PredictionRecord], taus: Sequence[float]) -> list[float]:
    """The thresholds whose deferred images all have LVLM answers in these records."""
    missing = [r.entropy for r in records if r.lvlm_choice is None]
    lowest_ok = max(missing) if missing else -math.inf  # tau must be >= every unanswered entropy
    return [t for t in taus if t >= lowest_ok]


def sweep(
    records: Sequence[PredictionRecord], num_classes: int, taus: Sequence[float] | None = None
) -> list[dict]:
    """Accuracy, mean per-class recall and deferral fraction for each tau (the accuracy-vs-calls curve)."""
    recs = [r for r in records if r.label >= 0]
    taus = answerable_taus(recs, tau_grid([r.entropy for r in recs]) if taus is None else taus)
    labels = [r.label for r in recs]
    rows = []
    for tau in taus:
        preds = final_at_tau(recs, tau)
        deferred = defer_mask([r.entropy for r in recs], tau)
        rows.append(
            {
                "tau": tau,
                "deferred": int(deferred.sum()),
                "deferral": float(deferred.mean()) if len(recs) else 0.0,
                "acc1": accuracy(preds, labels, num_classes),
                "mean_per_class_recall": accuracy(preds, labels, num_classes, "macro"),
            }
        )
    return rows


def deferred_analysis(records: Sequence[PredictionRecord], num_classes: int, topk: int | None = None) -> dict:
    """On the images the gate deferred: CLIP's accuracy against the LVLM's, top-k coverage, fallbacks.

    ``topk`` is the number of candidates the LVLM was shown (``cascade.topk``); coverage is the fraction
    of images whose true class was among them (all stored ids when None).
    """
    recs = [r for r in records if r.label >= 0]
    d = [r for r in recs if r.deferred]
    labels = [r.label for r in d]
    out = {
        "images": len(recs),
        "deferred": len(d),
        "deferral": len(d) / len(recs) if recs else 0.0,
        "topk_coverage_all": float(np.mean([r.label in r.clip_topk[:topk] for r in recs]))
        if recs
        else float("nan"),
        "topk_coverage_deferred": float(np.mean([r.label in r.clip_topk[:topk] for r in d]))
        if d
        else float("nan"),
        "deferred_clip_acc1": accuracy([r.clip_pred for r in d], labels, num_classes),
        "deferred_lvlm_acc1": accuracy([r.lvlm_choice for r in d], labels, num_classes)
        if d and all(r.lvlm_choice is not None for r in d)
        else float("nan"),
        "fallbacks": dict(Counter(r.fallback for r in d if r.fallback)),
    }
    # what the LVLM bought: images it fixed minus images it broke
    out["lvlm_fixed"] = sum(r.lvlm_choice == r.label != r.clip_pred for r in d)
    out["lvlm_broke"] = sum(r.clip_pred == r.label != r.lvlm_choice for r in d)
    return out
