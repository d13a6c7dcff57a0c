"""Oxford-IIIT Pets: ``annotations/{trainval,test}.txt`` lines '<image> <class id> <species> <breed id>'."""

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
    read_lines,
)
from cascadevlm.data.spec import BenchmarkSpec


def read(root: Path, spec: BenchmarkSpec, options: ReadOptions) -> Listing:
    index = ClassIndex(spec)
    splits = {}
    for split, fname in (("train", "trainval.txt"), ("test", "test.txt")):
        path = root / "annotations" / fname
        items = []
        for n, line in read_lines(path, spec.name):
            parts = line.split()
            where = f"{path}, line {n}"
            if len(parts) < 2:
                raise PrepareError(
                    f"{where}: expected '<image> <class id> <species> <breed id>', got {line!r}"
                )
            image, label = (
                parts[0],
                check_range(as_int(parts[1], where), 1, spec.num_classes, where, "class id"),
            )
            # The breed is also spelled in the image name; a disagreement means a mixed-up list file.
            breed = image.rsplit("_", 1)[0]
            if index.lookup(breed, f"{where}, image {image!r}") != label - 1:
                raise PrepareError(
                    f"{where}: image {image!r} has class id {label} ({spec.class_names[label - 1]}), "
                    f"but its name says {breed!r}"
                )
            items.append((root / "images" / f"{image}.jpg", label - 1))
        splits[split] = items
    return Listing(splits, "official trainval / test (annotations/trainval.txt, test.txt)")


FORMAT = RawFormat(
    name="oxford_pets",
    roots=("", "oxford-iiit-pet", "oxford_pets", "oxford-pets"),
    markers=("annotations/trainval.txt", "annotations/test.txt"),
    image_dirs=("images", ""),
    read=read,
)
