"""Metrics from records: mean per-class recall averages over the classes present in the labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import recall_score

from cascadevlm.clip.module import PresentClassRecall
from cascadevlm.records import PredictionRecord
from cascadevlm.report.metrics import classification_metrics, mean_per_class_recall


def _records(preds, labels, num_classes):
    out = []
    for i, (p, y) in enumerate(zip(preds, labels, strict=True)):
        top = [p] + [c for c in range(num_classes) if c != p][:4]
        out.append(PredictionRecord(i, y, top, [0.6] + [0.1] * 4, 1.0, p))
    return out


def test_a_class_absent_from_the_labels_does_not_count_as_zero():
    labels = [0, 0, 0, 1, 1, 3]
    preds = [0, 2, 0, 1, 2, 3]  # class 2 is predicted but never the true class; class 4 never appears
    ref = recall_score(labels, preds, average="macro", labels=sorted(set(labels)))
    by_hand = np.mean([2 / 3, 1 / 2, 1.0])
    assert ref == pytest.approx(by_hand)
    assert mean_per_class_recall(preds, labels, 5) == pytest.approx(ref)
    m = classification_metrics(_records(preds, labels, 5), 5)
    assert m["mean_per_class_recall"] == pytest.approx(ref) and m[
        "clip_mean_per_class_recall"
    ] == pytest.approx(ref)
    metric = PresentClassRecall(5)
    metric.update(torch.tensor(preds[:3]), torch.tensor(labels[:3]))
    metric.update(torch.tensor(preds[3:]), torch.tensor(labels[3:]))
    assert float(metric.compute()) == pytest.approx(ref)


def test_mean_per_class_recall_matches_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 200)  # 10 classes, 3 never present
    preds = rng.integers(0, 10, 200)
    ref = recall_score(labels, preds, average="macro", labels=sorted(set(labels.tolist())))
    assert mean_per_class_recall(preds.tolist(), labels.tolist(), 10) == pytest.approx(ref)


def test_metrics_carry_no_float32_noise():
    """torchmetrics computes in float32: 578 right of 1000 was 0.578000009059906 in metrics.json and CSVs."""
    from cascadevlm.report.analysis import sweep

    labels = [i % 5 for i in range(1000)]
    preds = [y if i < 578 else (y + 1) % 5 for i, y in enumerate(labels)]
    records = _records(preds, labels, 5)
    m = classification_metrics(records, 5)
    assert m["acc1"] == m["clip_acc1"] == 0.578 and m["clip_acc5"] == 1.0
    assert sweep(records, 5, [float("inf")])[0]["acc1"] == 0.578
