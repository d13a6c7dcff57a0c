"""Metrics from prediction records (torchmetrics functional, so the numbers match the Lightning logs).

torchmetrics computes in float32; each number is returned as the float32's shortest digits
(:func:`~cascadevlm.report.formats.plain_float`: 0.578, not 0.578000009059906), so metrics.json, sweep.csv
and the tables built from them carry no float32 noise."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import multiclass_accuracy

from cascadevlm.records import PredictionRecord
from cascadevlm.report.formats import plain_float


def per_class_counts(
    preds: Sequence[int], labels: Sequence[int], num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class: correct predictions, images and predictions, each one bincount of C (torchmetrics'
    per-class averages count a C x C confusion matrix: 800 MB and seconds a call at 10,000 classes)."""
    p, t = torch.tensor(list(preds)), torch.tensor(list(labels))
    tp = torch.bincount(t[p == t], minlength=num_classes)
    return tp, torch.bincount(t, minlength=num_classes), torch.bincount(p, minlength=num_classes)


def _mean_recall(
    preds: Sequence[int], labels: Sequence[int], num_classes: int, over_predicted: bool
) -> float:
    """Recall (float32, as torchmetrics) averaged over the classes with images, and with
    ``over_predicted`` also over those only predicted (recall 0: torchmetrics' macro average)."""
    tp, support, predicted = per_class_counts(preds, labels, num_classes)
    recall = tp.float() / support.clamp(min=1).float()
    keep = (support + predicted > 0) if over_predicted else support > 0
    return plain_float(float(recall[keep].mean()))


def accuracy(preds: Sequence[int], labels: Sequence[int], num_classes: int, average: str = "micro") -> float:
    if len(preds) == 0:
        return float("nan")
    if average == "macro":  # torchmetrics' value, in O(C) memory
        return _mean_recall(preds, labels, num_classes, over_predicted=True)
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
    return _mean_recall(preds, labels, num_classes, over_predicted=False)


def classification_metrics(records: Sequence[PredictionRecord], num_classes: int) -> dict:
    """acc1 / mean per-class recall of the final predictions, and CLIP's own acc1 / acc5.

    Records with an unknown label (-1) are left out.
    """
    recs = [r for r in records if r.label >= 0]
    if not recs:
        return {"n": 0}
    labels = [r.label for r in recs]
    k = min(5, num_classes, min(len(r.clip_topk) for r in recs))
    # the label among the stored top-k (most probable first): no [N, C] score matrix
    hits = torch.tensor([r.label in r.clip_topk[:k] for r in recs], dtype=torch.float32)
    clip_acc5 = plain_float(float(hits.sum() / len(recs)))
    return {
        "n": len(recs),
        "acc1": accuracy([r.final for r in recs], labels, num_classes),
        "mean_per_class_recall": mean_per_class_recall([r.final for r in recs], labels, num_classes),
        "clip_acc1": accuracy([r.clip_pred for r in recs], labels, num_classes),
        f"clip_acc{k}": clip_acc5,
        "clip_mean_per_class_recall": mean_per_class_recall([r.clip_pred for r in recs], labels, num_classes),
    }
