import json
from collections import Counter

import pytest

from cascadevlm.data.kshot import KShotSplit, sample_kshot

LABELS = [i % 5 for i in range(100)] + [4] * 7  # 5 classes, 20 each, class 4 has 27


def test_balanced_and_deterministic():
    a = sample_kshot(LABELS, 4, seed=1, dataset="toy", num_classes=5)
    b = sample_kshot(LABELS, 4, seed=1, dataset="toy", num_classes=5)
    assert a == b
    assert sorted(a.indices) == list(range(5))
    for c, rows in a.indices.items():
        assert len(rows) == 4 and len(set(rows)) == 4
        assert all(LABELS[r] == c for r in rows)
    assert Counter(LABELS[i] for i in a.all_indices) == {c: 4 for c in range(5)}


def test_seed_and_dataset_change_the_draw():
    base = sample_kshot(LABELS, 4, 1, "toy", 5)
    assert sample_kshot(LABELS, 4, 2, "toy", 5).indices != base.indices
    assert sample_kshot(LABELS, 4, 1, "other", 5).indices != base.indices


def test_k_larger_than_smallest_class():
    with pytest.raises(
        ValueError, match=r"k=21 is larger than the smallest class of 'toy': class 0 has 20 images"
    ):
        sample_kshot(LABELS, 21, 1, "toy", 5)


def test_split_file_roundtrip(tmp_path):
    split = sample_kshot(LABELS, 2, 3, "toy", 5)
    path = split.save(tmp_path / "s.json")
    assert KShotSplit.load(path) == split
    assert json.loads(path.read_text())["k"] == 2
    (tmp_path / "bad.json").write_text('{"dataset": "toy"}')
    with pytest.raises(ValueError, match="k-shot split file .*bad.json.* is malformed"):
        KShotSplit.load(tmp_path / "bad.json")


def test_datamodule_writes_and_reuses_the_split(data_root, tmp_path):
    from cascadevlm.data.datamodule import CascadeDataModule

    dm = CascadeDataModule(
        "fashion_mnist", data_root=str(data_root), shots=4, seed=2, splits_dir=str(tmp_path)
    )
    split = dm.kshot_split()
    assert (tmp_path / "fashion_mnist_k4_seed2.json").exists()
    labels = dm.labels("train")
    assert Counter(labels[i] for i in split.all_indices) == {c: 4 for c in range(10)}
    assert (
        CascadeDataModule("fashion_mnist", data_root=str(data_root), splits_dir=str(tmp_path)).kshot_split(
            4, 2
        )
        == split
    )
