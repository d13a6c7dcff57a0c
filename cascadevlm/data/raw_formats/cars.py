"""Stanford Cars: devkit .mat annotations (struct arrays with ``class`` and ``fname``)."""

from __future__ import annotations

from pathlib import Path

from cascadevlm.data.raw_formats._common import (
    ClassIndex,
    Listing,
    PrepareError,
    RawFormat,
    ReadOptions,
    as_int,
    check_range,
    load_mat,
    struct_field,
)
from cascadevlm.data.spec import BenchmarkSpec

_TEST_ANNOS = ("cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat")


def _annotations(path: Path, image_dir: Path, meta_labels: list[int], dataset: str) -> list:
    annos = load_mat(path, dataset, ("annotations",))["annotations"]
    classes = struct_field(annos, "class", path, "annotations")
    fnames = struct_field(annos, "fname", path, "annotations")
    items = []
    for i, (cls, fname) in enumerate(zip(classes, fnames, strict=True), 1):
        where = f"{path}, annotation {i} ({fname})"
        c = check_range(as_int(cls, where), 1, len(meta_labels), where, "class")
        items.append((image_dir / str(fname), meta_labels[c - 1]))
    return items


def read(root: Path, spec: BenchmarkSpec, options: ReadOptions) -> Listing:
    index = ClassIndex(spec)
    meta_path = root / "devkit" / "cars_meta.mat"
    names = load_mat(meta_path, spec.name, ("class_names",))["class_names"]
    meta_labels = [index.lookup(str(n), f"{meta_path}, class {i}") for i, n in enumerate(names, 1)]
    test_path = next((root / p for p in _TEST_ANNOS if (root / p).is_file()), None)
    if test_path is None:
        raise PrepareError(
            f"missing annotation file {root / _TEST_ANNOS[0]} (needed to prepare {spec.name}; "
            "devkit/cars_test_annos.mat has no labels: get cars_test_annos_withlabels.mat)"
        )
    train = _annotations(
        root / "devkit" / "cars_train_annos.mat", root / "cars_train", meta_labels, spec.name
    )
    test = _annotations(test_path, root / "cars_test", meta_labels, spec.name)
    return Listing(
        {"train": train, "test": test},
        "official train / test (devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat)",
    )


FORMAT = RawFormat(
    name="stanford_cars",
    roots=("", "stanford_cars", "stanford-cars", "cars"),
    markers=("devkit/cars_meta.mat", "devkit/cars_train_annos.mat"),
    image_dirs=("", "cars_train", "cars_test"),
    read=read,
)
