"""Food-101: ``meta/{train,test}.json`` ({class: ['class/id', ...]}) and ``meta/classes.txt``."""

from __future__ import annotations

import json
from pathlib import Path

from cascadevlm.data.raw_formats._common import (
    ClassIndex,
    Listing,
    PrepareError,
    RawFormat,
    ReadOptions,
    need_file,
    read_lines,
)
from cascadevlm.data.spec import BenchmarkSpec


def read(root: Path, spec: BenchmarkSpec, options: ReadOptions) -> Listing:
    index = ClassIndex(spec)
    classes_path = root / "meta" / "classes.txt"
    known = {name for _, name in read_lines(classes_path, spec.name)}
    for n, name in read_lines(classes_path, spec.name):
        index.lookup(name, f"{classes_path}, line {n}")
    splits = {}
    for split in ("train", "test"):
        path = need_file(root / "meta" / f"{split}.json", spec.name)
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise PrepareError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(table, dict):
            raise PrepareError(f"{path}: expected an object {{class: [images]}}, got {type(table).__name__}")
        items = []
        for name, entries in table.items():
            if name not in known:
                raise PrepareError(f"{path}: class {name!r} is not listed in {classes_path}")
            label = index.lookup(name, str(path))
            for entry in entries:
                items.append((root / "images" / f"{entry}.jpg", label))
        splits[split] = items
    return Listing(splits, "official train / test (meta/train.json, meta/test.json)")


FORMAT = RawFormat(
    name="food101",
    roots=("", "food-101", "food101"),
    markers=("meta/train.json", "meta/test.json"),
    image_dirs=("images", ""),
    read=read,
)
