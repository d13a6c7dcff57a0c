"""--data.image_column / --data.label_column / --data.class_names FILE on datasets with other column names."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import pytest

from cascadevlm.cli import run_evaluate as evaluate_main
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.records import read_records
from cascadevlm.testing.images import sample_photos

NAMES = ["animal", "person", "object"]
PHOTOS = [("chelsea", 0), ("horse", 0), ("astronaut", 1), ("grace_hopper", 1), ("coffee", 2), ("rocket", 2)]


@pytest.fixture(scope="module")
def photos() -> list[tuple[bytes, int]]:
    imgs = sample_photos()
    out = []
    for name, label in PHOTOS:
        buf = io.BytesIO()
        imgs[name].convert("RGB").resize((40, 40)).save(buf, format="PNG")
        out.append((buf.getvalue(), label))
    return out


def _save(root: Path, columns: dict, features: dict) -> str:
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(root))
    return str(root)


@pytest.fixture(scope="module")
def sources(photos, tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("columns")
    images = [{"bytes": b, "path": None} for b, _ in photos]
    labels = [label for _, label in photos]
    (tmp / "names.txt").write_text("\n".join(NAMES) + "\n\n")
    return {
        "standard": _save(
            tmp / "standard",
            {"image": images, "label": labels},
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)},
        ),
        "renamed": _save(  # image as "picture", integer label "y", and a caption column
            tmp / "renamed",
            {"picture": images, "y": labels, "caption": ["x"] * len(labels)},
            {"picture": datasets.Image(), "y": datasets.Value("int64"), "caption": datasets.Value("string")},
        ),
        "two_labels": _save(
            tmp / "two_labels",
            {"image": images, "fine": labels, "coarse": [0] * len(labels)},
            {
                "image": datasets.Image(),
                "fine": datasets.ClassLabel(names=NAMES),
                "coarse": datasets.ClassLabel(names=["thing", "other"]),
            },
        ),
        "names": str(tmp / "names.txt"),
    }


def test_renamed_image_column_and_integer_labels_with_a_names_file_equal_the_standard_dataset(
    sources, tiny_clip_path, tmp_path
):
    extra = {
        "standard": [],
        "renamed": [
            "--data.image_column", "picture", "--data.label_column", "y", "--data.class_names", sources["names"],
        ],
    }  # fmt: skip
    runs = {}
    for name, flags in extra.items():
        args = [
            "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
            "--data.dataset", sources[name], *flags, "--data.batch_size", "4",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--output_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"), "--run_name", name,
        ]  # fmt: skip
        metrics = evaluate_main(args)["metrics"]
        recs = read_records(tmp_path / "runs" / name / "records.parquet")
        runs[name] = (metrics["acc1"], [(r.index, r.label, r.clip_topk, r.clip_topk_probs) for r in recs])
    assert [label for _, label, _, _ in runs["renamed"][1]] == [label for _, label in PHOTOS]
    assert runs["renamed"] == runs["standard"]


def test_column_options_in_the_data_module(sources):
    dm = CascadeDataModule(
        sources["renamed"], image_column="picture", label_column="y", class_names=sources["names"]
    )
    assert dm.class_names == NAMES
    assert dm.labels() == [label for _, label in PHOTOS]
    with pytest.raises(ValueError, match="no ClassLabel feature; give data.class_names"):
        CascadeDataModule(sources["renamed"], image_column="picture", label_column="y")
    # the only Image column is found without --data.image_column
    assert CascadeDataModule(sources["renamed"], label_column="y", class_names=NAMES).labels() == dm.labels()
    with pytest.raises(ValueError) as err:
        CascadeDataModule(sources["two_labels"])
    assert str(err.value) == (
        f"split 'test' of {sources['two_labels']!r} has 2 ClassLabel columns ['fine', 'coarse']; "
        "pick one with --data.label_column"
    )
    dm = CascadeDataModule(sources["two_labels"], label_column="coarse")
    assert dm.class_names == ["thing", "other"] and set(dm.labels()) == {0}
    with pytest.raises(ValueError, match="has no column 'lbl' \\(--data.label_column\\)"):
        CascadeDataModule(sources["standard"], label_column="lbl")
    with pytest.raises(ValueError, match="give a list of names or a file"):
        CascadeDataModule(sources["standard"], class_names="missing.txt")
