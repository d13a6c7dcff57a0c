"""DTD: ``labels/{train,val,test}<fold>.txt`` lines '<class>/<image>.jpg' (ten official folds)."""

from __future__ import annotations

from pathlib import Path

from cascadevlm.data.raw_formats._common import (
    ClassIndex,
    Listing,
    PrepareError,
    RawFormat,
    ReadOptions,
    check_range,
    read_lines,
)
from cascadevlm.data.spec import BenchmarkSpec


def read(root: Path, spec: BenchmarkSpec, options: ReadOptions) -> Listing:
    index = ClassIndex(spec)
    fold = check_range(options.fold, 1, 10, f"{spec.name} --fold", "fold")
    splits = {}
    for split in ("train", "val", "test"):
        path = root / "labels" / f"{split}{fold}.txt"
        items = []
        for n, rel in read_lines(path, spec.name):
            cls, sep, _ = rel.partition("/")
            if not sep:
                raise PrepareError(f"{path}, line {n}: expected '<class>/<image>.jpg', got {rel!r}")
            items.append((root / "images" / rel, index.lookup(cls, f"{path}, line {n}")))
        splits[split] = items
    return Listing(splits, f"official train / val / test of fold {fold} (labels/*{fold}.txt)")


FORMAT = RawFormat(
    name="dtd",
    roots=("", "dtd", "dtd/dtd"),
    markers=("labels", "images"),
    image_dirs=("images", ""),
    read=read,
)
