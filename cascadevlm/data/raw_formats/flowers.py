"""Oxford Flowers 102: ``imagelabels.mat`` (labels 1..102) and ``setid.mat`` (trnid / valid / tstid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cascadevlm.data.raw_formats._common import Listing, RawFormat, ReadOptions, as_int, check_range, load_mat
from cascadevlm.data.spec import BenchmarkSpec


def read(root: Path, spec: BenchmarkSpec, options: ReadOptions) -> Listing:
    labels_path, setid_path = root / "imagelabels.mat", root / "setid.mat"
    labels = np.atleast_1d(load_mat(labels_path, spec.name, ("labels",))["labels"])
    setid = load_mat(setid_path, spec.name, ("trnid", "valid", "tstid"))
    splits = {}
    for split, var in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        items = []
        for image_id in np.atleast_1d(setid[var]):
            where = f"{setid_path}, {var}"
            i = check_range(as_int(image_id, where), 1, len(labels), where, "image id")
            where = f"{labels_path}, image {i}"
            label = check_range(as_int(labels[i - 1], where), 1, spec.num_classes, where)
            items.append((root / "jpg" / f"image_{i:05d}.jpg", label - 1))
        splits[split] = items
    return Listing(splits, "official train / val / test (setid.mat trnid / valid / tstid)")


FORMAT = RawFormat(
    name="flowers102",
    roots=("", "flowers102", "flowers-102", "102flowers", "oxford_flowers102"),
    markers=("imagelabels.mat", "setid.mat"),
    image_dirs=("jpg", ""),
    read=read,
)
