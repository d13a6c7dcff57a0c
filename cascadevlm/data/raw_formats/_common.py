"""What every raw-format reader shares: the listing it returns, file helpers with errors naming the file,
and the class-name index that maps official spellings to registry labels."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cascadevlm.data.spec import BenchmarkSpec

Item = tuple[Path, int]  # (image file, registry label 0..K-1)


class PrepareError(ValueError):
    """The raw download cannot be prepared as asked; the message names the file and what was expected."""


@dataclass
class Listing:
    """Images per split, as read from the official annotation files (or a split file)."""

    splits: dict[str, list[Item]]
    note: str  # where the splits come from, for the card


@dataclass(frozen=True)
class ReadOptions:
    seed: int = 0
    fold: int = 1  # DTD's ten official folds


@dataclass(frozen=True)
class RawFormat:
    """How one dataset's official download is laid out and read."""

    name: str
    roots: tuple[str, ...]  # where the dataset root may sit inside the given raw directory
    markers: tuple[str, ...]  # files or folders, relative to the root, that identify the download
    image_dirs: tuple[str, ...]  # what split-file paths may be relative to, relative to the root
    read: Callable[[Path, BenchmarkSpec, ReadOptions], Listing]
    describe_markers: str = ""

    def find_root(self, raw: Path) -> Path | None:
        """The dataset root: the first candidate folder holding every marker, or None."""
        for sub in self.roots:
            root = raw / sub if sub else raw
            if all((root / m).exists() for m in self.markers):
                return root
        return None

    def find_image_root(self, raw: Path) -> Path | None:
        """Without annotation files (split-file mode): the first candidate holding an image folder."""
        for sub in self.roots:
            root = raw / sub if sub else raw
            if root.is_dir() and any((root / d).is_dir() for d in self.image_dirs if d):
                return root
        return None


def normalise(name: str) -> str:
    """Spelling-insensitive key: lower-case alphanumeric tokens, sorted.

    Lets 'apple_pie' meet 'apple pie' and CoOp's '2012 Acura TL Sedan' meet 'Acura TL Sedan 2012'.
    """
    return " ".join(sorted(re.findall(r"[a-z0-9]+", name.lower())))


class ClassIndex:
    """Maps any known spelling of a class (clean, official, CoOp) to its registry label."""

    def __init__(self, spec: BenchmarkSpec):
        self.spec = spec
        raw = spec.extra.get("raw_names", spec.class_names)
        self._table: dict[str, int] = {}
        for i, (clean, official) in enumerate(zip(spec.class_names, raw, strict=True)):
            spellings = {clean, official, re.sub(r"^\d+\.", "", official)}  # CUB's "001." prefix
            for s in spellings:
                key = normalise(s)
                other = self._table.setdefault(key, i)
                if other != i:
                    raise ValueError(
                        f"{spec.name}: class names {spec.class_names[other]!r} and {clean!r} cannot be "
                        "told apart by spelling-insensitive matching"
                    )

    def find(self, name: str) -> int | None:
        """The registry label of ``name`` in any known spelling, or None."""
        return self._table.get(normalise(str(name)))

    def lookup(self, name: str, where: str) -> int:
        key = normalise(str(name))
        if key in self._table:
            return self._table[key]
        close = difflib.get_close_matches(str(name), self.spec.class_names, n=3, cutoff=0.6)
        hint = f"; closest: {close}" if close else ""
        raise PrepareError(f"{where}: class {name!r} is not a {self.spec.name} class{hint}")


def need_file(path: Path, dataset: str) -> Path:
    if not path.is_file():
        raise PrepareError(f"missing annotation file {path} (needed to prepare {dataset})")
    return path


def read_lines(path: Path, dataset: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-empty, non-comment lines of a text annotation file."""
    text = need_file(path, dataset).read_text(encoding="utf-8", errors="replace")
    return [
        (n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip() and line[0] != "#"
    ]


def load_mat(path: Path, dataset: str, keys: tuple[str, ...]) -> dict:
    """Variables ``keys`` of a MATLAB file (squeezed), with errors naming the file and the variable."""
    import scipy.io

    need_file(path, dataset)
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as err:  # scipy raises ValueError, TypeError or its own MatReadError
        raise PrepareError(f"{path} is not a readable MATLAB .mat file ({err})") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise PrepareError(f"{path} has no variable {missing[0]!r} (found: {found})")
    return {k: mat[k] for k in keys}


def struct_field(array: np.ndarray, name: str, path: Path, var: str) -> np.ndarray:
    """One field of a MATLAB struct array, as a 1-D array."""
    array = np.atleast_1d(array)
    if array.dtype.names is None or name not in array.dtype.names:
        raise PrepareError(f"{path}: struct {var!r} has no field {name!r} (fields: {array.dtype.names})")
    return np.atleast_1d(array[name])


def as_int(value, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PrepareError(f"{where}: expected an integer, got {value!r}") from None


def check_range(value: int, low: int, high: int, where: str, what: str = "label") -> int:
    if not low <= value <= high:
        raise PrepareError(f"{where}: {what} {value} is out of range {low}..{high}")
    return value
