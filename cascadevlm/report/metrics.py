"""Metrics from prediction records (torchmetrics functional, so the numbers match the Lightning logs).

torchmetrics computes in float32; each number is returned as the float32's shortest digits
(:func:`~cascadevlm.report.formats.plain_float`: 0.578, not 0.578000009059906), so metrics.json, sweep.csv
and the tables built from them carry no float32 noise."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_recall

from cascadevlm.records import PredictionRecord
from cascadevlm.report.formats import plain_float


def _topk_scores(records: Sequence[PredictionRecord], num_classes: int) -> torch.Tensor:
    """A score matrix holding each record's stored top-k probabilities (zeros elsewhere)."""
    scores = torch.zeros(len(records), num_classes, dtype=torch.float64)
    for i, r in enumerate(records):
        scores[i, r.clip_topk] = (
            torch.tensor(r.clip_topk_probs, dtype=torch.float64) + 1.0
        )  # > any unstored 0
    return scores


def accuracy(preds: Sequence[int], labels: Sequence[int], num_classes: int, average: str = "micro") -> float:
    if len(preds) == 0:
        return float("nan")
    return plain_float(
        float(
            multiclass_accuracy(
                torch.tensor(list(preds)), torch.tensor(list(labels)), num_classes, average=average
            )
        )
    )


def mean_per_class_recall(preds: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Recall averaged over the classes present in ``labels`` (a class with no image is not a 0).

    torchmetrics' macro average counts a class that is predicted but absent from the labels as recall 0;
    this equals ``sklearn.metrics.recall_score(labels, preds, average="macro", labels=present)``.
    """
    if len(preds) == 0:
        return float("nan")
    target = torch.tensor(list(labels))
    recall = multiclass_recall(torch.tensor(list(preds)), target, num_classes, average="none")
    present = torch.bincount(target, minlength=num_classes) > 0
    return plain_float(float(recall[present].mean()))


def classification_metrics(records: Sequence[PredictionRecord], num_classes: int) -> dict:
    """acc1 / mean per-class recall of the final predictions, and CLIP's own acc1 / acc5.

    Records with an unknown label (-1) are left out.
    """
    recs = [r for r in records if r.label >= 0]
    if not recs:
        return {"n": 0}
    labels = [r.label for r in recs]
    k = min(5, num_classes, min(len(r.clip_topk) for r in recs))
    clip_acc5 = plain_float(
        float(
            multiclass_accuracy(
                _topk_scores(recs, num_classes), torch.tensor(labels), num_classes, top_k=k, average="micro"
            )
        )
    )
    return {
        "n": len(recs),
        "acc1": accuracy([r.final for r in recs], labels, num_classes),
        "mean_per_class_recall": mean_per_class_recall([r.final for r in recs], labels, num_classes),
        "clip_acc1": accuracy([r.clip_pred for r in recs], labels, num_classes),
        f"clip_acc{k}": clip_acc5,
        "clip_mean_per_class_recall": mean_per_class_recall([r.clip_pred for r in recs], labels, num_classes),
    }
