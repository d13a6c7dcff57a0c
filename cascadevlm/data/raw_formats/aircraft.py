"""FGVC Aircraft (variant level): ``images_variant_{train,val,test}.txt`` lines '<image id> <variant>'."""

from __future__ import annotations

from pathlib import Path

from cascadevlm.data.raw_formats._common import (
    ClassIndex,
    Listing,
    PrepareError,
    RawFormat,
    ReadOptions,
    read_lines,
)
from cascadevlm.data.spec import BenchmarkSpec


def read(root: Path, spec: BenchmarkSpec, options: ReadOptions) -> Listing:
    index = ClassIndex(spec)
    variants_path = root / "variants.txt"
    variants = {}
    for n, name in read_lines(variants_path, spec.name):
        variants[name] = index.lookup(name, f"{variants_path}, line {n}")
    splits = {}
    for split in ("train", "val", "test"):
        path = root / f"images_variant_{split}.txt"
        items = []
        for n, line in read_lines(path, spec.name):
            image_id, _, variant = line.partition(" ")
            if not variant:
                raise PrepareError(f"{path}, line {n}: expected '<image id> <variant>', got {line!r}")
            if variant not in variants:
                raise PrepareError(f"{path}, line {n}: variant {variant!r} is not listed in {variants_path}")
            items.append((root / "images" / f"{image_id}.jpg", variants[variant]))
        splits[split] = items
    return Listing(splits, "official train / val / test (images_variant_*.txt)")


FORMAT = RawFormat(
    name="fgvc_aircraft",
    roots=("", "data", "fgvc-aircraft-2013b/data", "fgvc-aircraft-2013b"),
    markers=("variants.txt", "images_variant_train.txt"),
    image_dirs=("images", ""),
    read=read,
)
