"""train.py's adapter data module takes --data.image_column / --data.label_column / --data.class_names FILE."""

from __future__ import annotations

import io

import datasets
import pytest
import torch

from cascadevlm.clip.adapters.datamodule import KShotFeatureDataModule
from cascadevlm.testing.images import sample_photos

NAMES = ["animal", "person", "object"]
PHOTOS = [("chelsea", 0), ("horse", 0), ("astronaut", 1), ("grace_hopper", 1), ("coffee", 2), ("rocket", 2)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("adapter_columns")
    photos = sample_photos()
    images = []
    for name, _ in PHOTOS:
        buf = io.BytesIO()
        photos[name].convert("RGB").resize((40, 40)).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    labels = [label for _, label in PHOTOS]
    (tmp / "names.txt").write_text("\n".join(NAMES) + "\n")

    def save(name: str, columns: dict, features: dict) -> str:
        ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
        datasets.DatasetDict({"train": ds, "val": ds}).save_to_disk(str(tmp / name))
        return str(tmp / name)

    return {
        "standard": save("standard", {"image": images, "label": labels},
                         {"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)}),
        "renamed": save("renamed", {"picture": images, "y": labels},
                        {"picture": datasets.Image(), "y": datasets.Value("int64")}),
        "names": str(tmp / "names.txt"),
        "splits": str(tmp / "splits"),
    }  # fmt: skip


def _features(source: str, splits: str, bundle, **kw) -> KShotFeatureDataModule:
    dm = KShotFeatureDataModule(
        source, shots=1, seed=3, test_split=None, cache_dir=None, splits_dir=splits, **kw
    )
    dm.attach_bundle(bundle)
    dm.setup()
    return dm


def test_renamed_columns_and_a_names_file_give_the_standard_datasets_features(
    sources, tiny_clip_bundle, tmp_path
):
    ref = _features(sources["standard"], str(tmp_path / "a"), tiny_clip_bundle)
    dm = _features(
        sources["renamed"], str(tmp_path / "b"), tiny_clip_bundle,
        image_column="picture", label_column="y", class_names=sources["names"],
    )  # fmt: skip
    assert dm.class_names == ref.class_names == NAMES
    assert dm.targets["val"] == ref.targets["val"]
    assert torch.allclose(dm.features["val"], ref.features["val"], atol=1e-6)
    # the k-shot rows (one per class), with the features and labels of those rows
    rows = dm.source.kshot_split().all_indices
    assert sorted(dm.targets["train"]) == [0, 1, 2]
    assert dm.targets["train"] == [ref.targets["val"][i] for i in rows]  # train and val hold the same rows
    assert torch.allclose(dm.features["train"], ref.features["val"][rows], atol=1e-6)


def test_a_wrong_column_name_is_refused_naming_the_option(sources):
    with pytest.raises(ValueError, match=r"has no column 'pic' \(--data.image_column\)"):
        KShotFeatureDataModule(
            sources["renamed"], shots=1, test_split=None, image_column="pic", label_column="y"
        )
