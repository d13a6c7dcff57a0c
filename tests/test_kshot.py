import json
from collections import Counter

import pytest

from cascadevlm.data.kshot import KShotSplit, kshot_fingerprint, sample_kshot

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


@pytest.fixture(scope="module")
def small_fmnist_dirs(data_root, tmp_path_factory):
    """Two small save_to_disk copies of Fashion-MNIST, named unlike the registry ("clothes", "clothes2")."""
    import datasets

    from cascadevlm.data.demo import fashion_mnist_dir

    full = datasets.load_from_disk(str(fashion_mnist_dir(data_root)))
    root = tmp_path_factory.mktemp("fm")
    out = []
    for name, start in (("clothes", 0), ("clothes2", 1)):  # every 20th/50th row: all classes, other rows
        dd = datasets.DatasetDict(
            {
                s: full[s].select(range(start, len(full[s]), len(full[s]) // 250))
                for s in ("train", "val", "test")
            }
        )
        dd.save_to_disk(str(root / name))
        out.append(root / name)
    return out


def test_lora_and_adapter_data_modules_share_one_split_for_a_renamed_dataset(small_fmnist_dirs, tmp_path):
    from cascadevlm.clip.adapters import KShotFeatureDataModule
    from cascadevlm.lvlm.lora import LoRADataModule

    clothes = str(small_fmnist_dirs[0])
    splits = str(tmp_path / "splits")
    # The case: the adapter names the benchmark, LoRA has only the directory.
    adapter = KShotFeatureDataModule(
        clothes, benchmark="fashion_mnist", shots=2, seed=3, splits_dir=splits, cache_dir=None
    )
    lora = LoRADataModule(clothes, shots=2, seed=3, splits_dir=splits)
    assert lora.split.indices == adapter.source.kshot_split().indices
    # One file, named by the registry name the dataset's classes resolve to, carrying its fingerprint.
    [path] = (tmp_path / "splits").glob("*.json")
    assert path.name == "fashion_mnist_k2_seed3.json"
    assert json.loads(path.read_text())["fingerprint"] == adapter.kshot_fingerprint is not None


def test_a_stale_split_file_is_refused(small_fmnist_dirs, tmp_path):
    from cascadevlm.data.datamodule import CascadeDataModule

    splits = str(tmp_path / "splits")
    first = CascadeDataModule(str(small_fmnist_dirs[0]), splits_dir=splits).kshot_split(2, 1)
    other = CascadeDataModule(str(small_fmnist_dirs[1]), splits_dir=splits)  # same name, other rows
    path = tmp_path / "splits" / "fashion_mnist_k2_seed1.json"
    current = json.loads(path.read_text())["fingerprint"]
    with pytest.raises(ValueError) as err:
        other.kshot_split(2, 1)
    fp_other = kshot_fingerprint(other.dsd["train"], other.labels("train"))
    assert str(err.value) == (
        f"k-shot split file {str(path)!r} was drawn from other data (fingerprint {current} != {fp_other} of this "
        "dataset's training split); delete it to draw the split again, or use --data.splits_dir for another "
        "split directory"
    )
    # A file from before fingerprints is checked against the labels instead.
    legacy = json.loads(path.read_text())
    legacy.pop("fingerprint")
    path.write_text(json.dumps(legacy))
    assert (
        CascadeDataModule(str(small_fmnist_dirs[0]), splits_dir=splits).kshot_split(2, 1).indices
        == first.indices
    )
    with pytest.raises(
        ValueError, match=r"of its rows are missing or of another class in this dataset's training"
    ):
        other.kshot_split(2, 1)
