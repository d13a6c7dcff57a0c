"""EuroSAT (RGB): one folder per class; no official split, so a seeded class-stratified 50/20/30 one.

50/20/30 are the proportions of the split CoOp published (13,500 / 5,400 / 8,100 images); pass that
split file with ``--split-file`` to reproduce its exact images.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cascadevlm.data.raw_formats._common import ClassIndex, Listing, PrepareError, RawFormat, ReadOptions
from cascadevlm.data.spec import BenchmarkSpec

FRACTIONS = (0.5, 0.2, 0.3)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _natural_key(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def read(root: Path, spec: BenchmarkSpec, options: ReadOptions) -> Listing:
    index = ClassIndex(spec)
    per_class: dict[int, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = index.lookup(folder.name, f"{root}: folder {folder.name!r}")
        files = sorted((f for f in folder.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES), key=_natural_key)
        if not files:
            raise PrepareError(
                f"{folder}: no .jpg/.png images (the multispectral .tif release is not supported)"
            )
        per_class[label] = files
    raw_names = spec.extra.get("raw_names", spec.class_names)
    missing = [raw_names[i] for i in range(spec.num_classes) if i not in per_class]
    if missing:  # else a smaller label set would be prepared under the full class list
        raise PrepareError(
            f"{root}: no folder for {len(missing)} of the {spec.num_classes} classes ({', '.join(missing)}); "
            "the download is incomplete: extract EuroSAT.zip again"
        )
    rng = np.random.default_rng(options.seed)
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for label in sorted(per_class):
        files = per_class[label]
        order = rng.permutation(len(files))
        n_train = round(len(files) * FRACTIONS[0])
        n_val = round(len(files) * FRACTIONS[1])
        parts = {
            "train": order[:n_train],
            "val": order[n_train : n_train + n_val],
            "test": order[n_train + n_val :],
        }
        for split, idx in parts.items():
            splits[split].extend((files[i], label) for i in sorted(idx))
    return Listing(
        splits, f"no official split: class-stratified 50/20/30 train/val/test, seed {options.seed}"
    )


FORMAT = RawFormat(
    name="eurosat",
    roots=("", "2750", "EuroSAT_RGB", "EuroSAT", "eurosat/2750", "eurosat", "eurosat/EuroSAT_RGB"),
    markers=("AnnualCrop", "SeaLake"),
    image_dirs=("",),
    read=read,
)
