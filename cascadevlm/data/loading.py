"""Loading image-classification datasets (image folder, `save_to_disk` directory, hub name) robustly."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import datasets
import torch
from PIL import Image

from cascadevlm.data.images import ImageLoadError, decode, read_bytes, upright_rgb
from cascadevlm.data.registry import benchmark_names, get_benchmark

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"


def _class_label_deepcopy(self: datasets.ClassLabel, memo: dict) -> datasets.ClassLabel:
    """``copy.deepcopy`` of a ClassLabel, its lists of names and name -> id dict copied flat.

    ``datasets`` deep-copies a dataset's features on every ``Dataset.features`` read, ``cast_column`` and
    ``select``; the default deepcopy walks a ClassLabel's names one by one (three containers of C entries:
    12 ms a copy at 10,000 names, a dozen copies per run). Strings and ints are immutable, so a flat copy
    of a container of them is what deepcopy gives (equal, not shared); anything else is deep-copied.
    """
    new = copy.copy(self)  # the same attributes, shared
    memo[id(self)] = new
    for key, value in vars(self).items():
        if type(value) is list and set(map(type, value)) <= {str}:
            flat = list(value)
        elif (
            type(value) is dict and set(map(type, value)) <= {str} and set(map(type, value.values())) <= {int}
        ):
            flat = dict(value)
        else:
            flat = copy.deepcopy(value, memo)
        object.__setattr__(new, key, flat)
    return new


if "__deepcopy__" not in vars(datasets.ClassLabel):  # a datasets release with its own copy keeps it
    datasets.ClassLabel.__deepcopy__ = _class_label_deepcopy


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message names the file (or row) and why."""


def decode_image(value, where: str) -> Image.Image:
    """Decode a datasets image value ({"bytes", "path"} dict, path or PIL image) to an RGB PIL image.

    The same decoding as dataset preparation (:mod:`cascadevlm.data.images`): fully decoded now, so a
    truncated file fails here and not later in a worker; EXIF orientation applied; grayscale, palette,
    CMYK, 16-bit and RGBA become RGB. ``where`` names the image in errors (e.g. ``"test row 17"``).
    """
    if isinstance(value, Image.Image):
        return upright_rgb(value, where)
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
    path = str(path) if isinstance(path, (str, os.PathLike)) else None
    name = f"{where} ({path})" if path else where
    try:
        if data is None:
            if path is None:
                raise ImageDecodeError(f"{where}: no image bytes or path")
            data = read_bytes(path)
        return upright_rgb(decode(data, name), name)
    except ImageLoadError as err:
        if err.reason == "file not found":
            raise ImageDecodeError(f"image file missing: {name}") from None
        raise ImageDecodeError(f"corrupt or truncated image: {name}: {err.reason}") from None


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def load_dataset_dict(
    source: str, image_column: str | None = None, label_column: str | None = None
) -> datasets.DatasetDict:
    """A DatasetDict from an image-folder directory, a ``save_to_disk`` directory, or a hub name.

    An image folder is ``<root>/<split>/<class>/<image>`` or ``<root>/<class>/<image>`` (one ``train``
    split). Images stay undecoded here; :func:`decode_image` decodes them with clear errors.
    ``image_column`` / ``label_column`` name the columns when they are not ``image`` / ``label`` (by
    default the only Image / ClassLabel column is used).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if is_saved_dataset(path):
            _refuse_empty_saved_splits(path)  # datasets cannot load them (an IndexError deep inside)
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.Dataset):
                ds = datasets.DatasetDict({"train": ds})
        else:
            try:
                ds = datasets.load_dataset("imagefolder", data_dir=str(path))
            except Exception as err:  # datasets raises several types for an unusable folder
                raise ValueError(f"dataset directory {str(path)!r} is not an image folder: {err}") from err
            if image_column is None and label_column is None:
                _refuse_one_class_folder(path, ds)
    elif source.startswith(("/", "./", "~")) or os.sep in source and not _looks_like_hub_name(source):
        raise FileNotFoundError(f"dataset directory {source!r} does not exist")
    else:
        name = source
        try:
            name = get_benchmark(source).hub_name or source
        except KeyError:
            pass
        try:
            ds = datasets.load_dataset(name)
        except Exception as err:
            raise ValueError(
                f"unknown dataset {source!r}: not a directory, and the hub could not load it ({type(err).__name__}). "
                f"Registered benchmarks (prepare them with `python -m cascadevlm.data.prepare`): "
                f"{', '.join(benchmark_names())}"
            ) from err
    for split, d in ds.items():
        ds[split] = standard_columns(d, f"split {split!r} of {source!r}", image_column, label_column)
    return ds


def _refuse_empty_saved_splits(path: Path) -> None:
    """A ``save_to_disk`` split without rows (no data files) is refused naming it."""
    try:
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    except (OSError, ValueError, AttributeError):
        return  # a single Dataset, or a layout datasets reports itself
    for split in splits:
        try:
            files = json.loads((path / split / "state.json").read_text()).get("_data_files")
        except (OSError, ValueError, AttributeError):
            continue
        if files == []:
            raise ValueError(
                f"dataset directory {str(path)!r}: split {split!r} is empty (no images); prepare the dataset again "
                "or remove that split"
            )


def _refuse_one_class_folder(path: Path, ds: datasets.DatasetDict) -> None:
    """``imagefolder`` drops the label of a folder with one class folder; say so instead of "no label column"."""
    if any(LABEL_COLUMN in d.column_names for d in ds.values()):
        return
    folders = sorted({f.parent.name for f in path.rglob("*") if f.is_file() and f.parent != path})
    if len(folders) <= 1:
        raise ValueError(
            f"image folder {str(path)!r} has one class ({folders[0] if folders else 'no class folder'}): "
            "classification needs at least two class folders"
        )


# What a column holds, for messages about a column given for the other role.
_HOLDS = {datasets.Image: "images", datasets.ClassLabel: "class labels"}


def _holds(feature, kind: type) -> bool:
    """``feature`` holds ``kind``'s data: an Image column images; a ClassLabel or integer column labels."""
    if kind is datasets.ClassLabel and isinstance(feature, datasets.Value):
        return feature.dtype.startswith(("int", "uint"))
    return isinstance(feature, kind)


def _column_for(d, where: str, given: str | None, standard: str, kind: type, other: type, flag: str) -> str:
    """The column of ``d`` that becomes ``standard``: ``given`` (checked to exist and not to hold the other
    role's data), else ``standard`` itself, else the only column of feature type ``kind``."""
    features = d.features or {}
    if given is not None:
        if given not in d.column_names:
            raise ValueError(f"{where} has no column {given!r} ({flag}); columns: {d.column_names}")
        if _holds(features.get(given), other):
            mine = [c for c, f in features.items() if isinstance(f, kind)]
            raise ValueError(
                f"{where}: column {given!r} ({flag}) holds {_HOLDS[other]}, not {_HOLDS[kind]}; the "
                f"{_HOLDS[kind]} are in {mine or 'no column of that type'}"
            )
        return given
    if standard in d.column_names:
        return standard
    cands = [c for c, f in features.items() if isinstance(f, kind)]
    if not cands:
        raise ValueError(f"{where} has no {standard} column: {d.column_names}; name it with {flag}")
    if len(cands) > 1:
        raise ValueError(f"{where} has {len(cands)} {kind.__name__} columns {cands}; pick one with {flag}")
    return cands[0]


def standard_columns(d, where: str, image_column: str | None, label_column: str | None):
    """``d`` (a Dataset or IterableDataset) with its image column as ``image`` (undecoded) and its label
    column as ``label``."""
    if isinstance(d, datasets.IterableDataset):
        # Before any rename or cast: a stream's map/cast decodes each image and encodes it again (lossy
        # for JPEG); undecoded, the stored bytes pass through as the table's cast keeps them.
        d = d.decode(False)
    # both roles are resolved before any rename: renaming one must not hide the column given for the other
    image = _column_for(d, where, image_column, IMAGE_COLUMN, datasets.Image, datasets.ClassLabel,
                        "--data.image_column")  # fmt: skip
    label = _column_for(d, where, label_column, LABEL_COLUMN, datasets.ClassLabel, datasets.Image,
                        "--data.label_column")  # fmt: skip
    if image == label:
        raise ValueError(f"{where}: --data.image_column and --data.label_column are both {image!r}")
    clashing = [c for c in (IMAGE_COLUMN, LABEL_COLUMN) if c in d.column_names and c not in (image, label)]
    if clashing:
        d = d.remove_columns(clashing)
    renames = {old: new for old, new in ((image, IMAGE_COLUMN), (label, LABEL_COLUMN)) if old != new}
    if renames:
        d = d.rename_columns(renames)
    if (
        isinstance((d.features or {}).get(IMAGE_COLUMN), datasets.Image)
        and not d.features[IMAGE_COLUMN].decode
    ):
        return d  # a stream, undecoded from the start (above)
    return d.cast_column(IMAGE_COLUMN, datasets.Image(decode=False))


def _looks_like_hub_name(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/"))


def dataset_class_names(ds: datasets.Dataset) -> list[str] | None:
    feat = (ds.features or {}).get(LABEL_COLUMN)
    if isinstance(feat, datasets.ClassLabel):
        return list(feat.names)
    return None


class ImageClassificationDataset(torch.utils.data.Dataset):
    """Rows of a HF dataset as ``{"index", "label", "pixel_values"}`` with a CLIP preprocess transform."""

    def __init__(
        self, ds: datasets.Dataset, transform, split: str, indices: list[int] | None = None, hint: str = ""
    ) -> None:
        self.ds = ds
        self.transform = transform
        self.split = split
        self.indices = list(range(len(ds))) if indices is None else list(indices)
        self.hint = hint  # appended to decoding errors: the option that gets past them

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        row = self.indices[i]
        item = self.ds[row]
        try:
            img = decode_image(item[IMAGE_COLUMN], f"{self.split} row {row}")
        except ImageDecodeError as err:
            if not self.hint:
                raise
            raise ImageDecodeError(f"{err}{self.hint}") from None
        return {"index": row, "label": int(item[LABEL_COLUMN]), "pixel_values": self.transform(img)}


class FeatureDataset(torch.utils.data.Dataset):
    """Cached image features as ``{"index", "label", "features"}`` rows."""

    def __init__(self, features: torch.Tensor, labels: list[int], indices: list[int] | None = None) -> None:
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} cached feature rows but {len(labels)} labels")
        self.features = features
        self.labels = labels
        self.indices = list(range(len(labels))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        row = self.indices[i]
        return {"index": row, "label": int(self.labels[row]), "features": self.features[row]}
