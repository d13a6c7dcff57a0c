"""CUB-200-2011: ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``, ``classes.txt``."""

from __future__ import annotations

from pathlib import Path

from cascadevlm.data.raw_formats._common import (
    ClassIndex,
    Listing,
    PrepareError,
    RawFormat,
    ReadOptions,
    as_int,
    read_lines,
)
from cascadevlm.data.spec import BenchmarkSpec


def _pairs(path: Path, dataset: str) -> dict[int, str]:
    """'<id> <value>' lines as {id: value}, rejecting malformed and repeated ids."""
    out: dict[int, str] = {}
    for n, line in read_lines(path, dataset):
        key, _, value = line.partition(" ")
        if not value:
            raise PrepareError(f"{path}, line {n}: expected '<id> <value>', got {line!r}")
        k = as_int(key, f"{path}, line {n}")
        if k in out:
            raise PrepareError(f"{path}, line {n}: id {k} is listed twice")
        out[k] = value.strip()
    return out


def read(root: Path, spec: BenchmarkSpec, options: ReadOptions) -> Listing:
    index = ClassIndex(spec)
    classes_path = root / "classes.txt"
    classes = {
        k: index.lookup(v, f"{classes_path}, class {k}") for k, v in _pairs(classes_path, spec.name).items()
    }
    images_path = root / "images.txt"
    images = _pairs(images_path, spec.name)
    labels_path = root / "image_class_labels.txt"
    labels = _pairs(labels_path, spec.name)
    split_path = root / "train_test_split.txt"
    is_train = _pairs(split_path, spec.name)
    splits: dict[str, list] = {"train": [], "test": []}
    for image_id, rel in images.items():
        for table, path in ((labels, labels_path), (is_train, split_path)):
            if image_id not in table:
                raise PrepareError(f"{path}: no entry for image id {image_id} (listed in {images_path})")
        cls = as_int(labels[image_id], f"{labels_path}, image {image_id}")
        if cls not in classes:
            raise PrepareError(
                f"{labels_path}, image {image_id}: class {cls} is out of range (not in {classes_path})"
            )
        flag = is_train[image_id]
        if flag not in ("0", "1"):
            raise PrepareError(
                f"{split_path}, image {image_id}: expected 1 (train) or 0 (test), got {flag!r}"
            )
        splits["train" if flag == "1" else "test"].append((root / "images" / rel, classes[cls]))
    return Listing(splits, "official train / test (train_test_split.txt)")


FORMAT = RawFormat(
    name="cub200",
    roots=("", "CUB_200_2011", "cub200", "CUB_200_2011/CUB_200_2011"),
    markers=("images.txt", "image_class_labels.txt"),
    image_dirs=("images", ""),
    read=read,
)
