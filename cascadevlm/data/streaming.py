"""Evaluation straight from a stream: webdataset shards, a streaming hub dataset, an image folder.

Nothing is materialised: a split is a :class:`datasets.IterableDataset` whose images stay undecoded
until the one process that evaluates them decodes them. Row ``i`` of a stream is its ``i``-th sample,
the same row the materialised dataset (``prepare --wds``, ``load_dataset``) gives it, so records match.

Splitting over processes: every (rank, dataloader worker) slot keeps the samples ``slot``,
``slot + slots``, ... of the stream (``datasets.distributed.split_dataset_by_node`` with
``strategy="examples"``), so sample ``j`` of a slot is row ``slot + slots * j``: each image is decoded
and evaluated exactly once, and its row is known without counting the other slots' samples. Every slot
reads the whole stream's bytes (skipping is cheap, decoding is not); a shard-wise split would read less
but would lose the rows (a shard's length is unknown until it is read).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from cascadevlm.data.loading import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    ImageDecodeError,
    decode_image,
    standard_columns,
)

__all__ = [
    "StreamedImages",
    "StreamedRows",
    "is_stream",
    "load_stream_dict",
    "stream_fingerprint",
    "stream_labels",
]


def is_stream(dataset) -> bool:
    """Whether ``dataset`` is a stream (rows read in order) rather than a table (rows by index)."""
    return isinstance(dataset, datasets.IterableDataset)


def _slot() -> tuple[int, int]:
    """This process's (slot, slots) over distributed ranks x dataloader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


def _rows(stream: datasets.IterableDataset, slot: int, slots: int) -> Iterator[tuple[int, dict]]:
    """(row, sample) for this slot's samples of ``stream``, in stream order."""
    part = (
        split_dataset_by_node(stream, rank=slot, world_size=slots, strategy="examples")
        if slots > 1
        else stream
    )
    j = 0
    # .iter() rather than iter(): an IterableDataset iterated inside a DataLoader worker would split
    # itself by shards among the workers on top of our split, and the rows would be lost.
    for batch in part.iter(batch_size=32):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            yield slot + slots * j, dict(zip(keys, values, strict=True))
            j += 1


def _check_label(label, row: int, split: str, num_classes: int) -> int:
    label = int(label)
    if not -1 <= label < num_classes:
        raise ValueError(
            f"split {split!r} row {row} has label {label} but there are {num_classes} class names (ids 0..{num_classes - 1}; "
            "-1 marks an unknown label): give one name per label id with --data.class_names"
        )
    return label


class StreamedImages(torch.utils.data.IterableDataset):
    """A stream's rows as ``{"index", "label", "pixel_values"}``, each decoded by exactly one slot."""

    def __init__(
        self, stream: datasets.IterableDataset, transform, split: str, num_classes: int, hint: str = ""
    ) -> None:
        self.stream, self.transform, self.split = stream, transform, split
        self.num_classes, self.hint = num_classes, hint

    def __iter__(self) -> Iterator[dict]:
        for row, sample in _rows(self.stream, *_slot()):
            try:
                img = decode_image(sample[IMAGE_COLUMN], f"{self.split} row {row}")
            except ImageDecodeError as err:
                raise ImageDecodeError(f"{err}{self.hint}") from None
            label = _check_label(sample[LABEL_COLUMN], row, self.split, self.num_classes)
            yield {"index": row, "label": label, "pixel_values": self.transform(img)}


class StreamedRows(torch.utils.data.IterableDataset):
    """The decoded images of some rows of a stream, as ``{"index", "image", **extra[row]}``.

    ``extra`` maps each wanted row to the fields served with it (the LVLM stage's candidates). The
    wanted rows are dealt out over the slots in row order; a slot stops reading after its last row.
    No ``__len__``: Lightning would read it as the number of batches of all workers together and stop early.
    """

    def __init__(self, stream: datasets.IterableDataset, extra: dict[int, dict], split: str) -> None:
        self.stream, self.extra, self.split = stream, extra, split

    def __iter__(self) -> Iterator[dict]:
        slot, slots = _slot()
        mine = sorted(self.extra)[slot::slots]
        if not mine:
            return
        wanted, last = set(mine), mine[-1]
        for row, sample in _rows(self.stream.take(last + 1), 0, 1):
            if row in wanted:
                image = decode_image(sample[IMAGE_COLUMN], f"{self.split} row {row}")
                yield {"index": row, "image": image, **self.extra[row]}
            if row >= last:
                return


def stream_labels(stream: datasets.IterableDataset) -> list[int]:
    """Every label of a stream in row order (one pass; no image is decoded)."""
    return [int(s[LABEL_COLUMN]) for _, s in _rows(stream.select_columns([LABEL_COLUMN]), 0, 1)]


def _resolved(d: datasets.IterableDataset) -> datasets.IterableDataset:
    # A hub stream without metadata knows its columns only once a sample is read.
    if d.features is None and hasattr(d, "_resolve_features"):
        return d._resolve_features()
    return d


def load_stream_dict(
    source: str,
    image_column: str | None = None,
    label_column: str | None = None,
    mirror_shards: dict[str, list[Path]] | None = None,
) -> datasets.IterableDatasetDict:
    """Each split of ``source`` as a stream with the standard ``image`` (undecoded) / ``label`` columns.

    ``mirror_shards``: the tar shards of a CLIP_benchmark webdataset mirror by split (its label is
    ``cls``); otherwise ``source`` is a ``save_to_disk`` folder, an image folder or a hub id.
    """
    path = Path(source).expanduser()
    if mirror_shards is not None:
        files = {split: [str(f) for f in fs] for split, fs in mirror_shards.items()}
        dsd = datasets.load_dataset("webdataset", data_files=files, streaming=True)
        label_column = label_column or "cls"
    elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.Dataset):
            saved = datasets.DatasetDict({"train": saved})
        dsd = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in saved.items()})
    elif path.is_dir():
        dsd = datasets.load_dataset("imagefolder", data_dir=str(path), streaming=True)
    elif source.startswith(("/", "./", "../", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"dataset directory {source!r} does not exist")
    else:
        try:
            dsd = datasets.load_dataset(source, streaming=True)
        except Exception as err:  # offline, unknown id, ...: one line naming the cause
            raise ValueError(
                f"--data.dataset {source!r} with --data.streaming true: not a folder, and the hub could not "
                f"stream it ({type(err).__name__}: {err})"
            ) from None
    if isinstance(dsd, datasets.IterableDataset):
        dsd = datasets.IterableDatasetDict({"train": dsd})
    return datasets.IterableDatasetDict(
        {
            split: standard_columns(
                _resolved(d), f"split {split!r} of {source!r}", image_column, label_column
            )
            for split, d in dsd.items()
        }
    )


def _file_identity(root: Path) -> list:
    out = []
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            p = Path(dirpath) / name
            st = p.stat()
            out.append([str(p.relative_to(root)), st.st_size, st.st_mtime_ns])
    return sorted(out)


def stream_fingerprint(source: str, split: str, limit: int | None, extra: dict | None = None) -> str:
    """What a stream's rows are: a local source's files (names, sizes, times), or a hub dataset's
    revision (its id alone when the hub cannot be asked; then a changed hub dataset goes unnoticed)."""
    path = Path(source).expanduser()
    if path.is_dir():
        what: dict = {"files": _file_identity(path.resolve())}
    else:
        try:
            from huggingface_hub import HfApi

            what = {"hub": source, "sha": HfApi().dataset_info(source).sha}
        except Exception:  # offline: the id is all there is
            what = {"hub": source}
    what.update(split=split, limit=limit, **(extra or {}))
    return "stream-" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]
