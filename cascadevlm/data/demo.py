"""The offline demo dataset: Fashion-MNIST (real photos, 10 confusable clothing classes).

Built from Debian's ``dataset-fashion-mnist`` package when it is installed, otherwise from the
Hugging Face hub, and saved with ``save_to_disk`` as train / val / test splits.
"""

from __future__ import annotations

import gzip
import os
import shutil
import uuid
from pathlib import Path

import datasets
import numpy as np

from cascadevlm.data.registry import FASHION_MNIST

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
VAL_PER_CLASS = 500  # held out of the official train split, class-balanced, first rows of each class


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the MNIST family's array format."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {arr.size} values (truncated?)")
    return arr.reshape(shape)


def _features() -> datasets.Features:
    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FASHION_MNIST.class_names))}
    )


def _split_val(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    val = np.concatenate([np.flatnonzero(labels == c)[:VAL_PER_CLASS] for c in range(10)])
    mask = np.zeros(len(labels), dtype=bool)
    mask[val] = True
    return np.flatnonzero(~mask), np.sort(val)


def build_fashion_mnist(out_dir: str | Path, raw_dir: str | Path = DEBIAN_DIR) -> datasets.DatasetDict:
    """Convert the IDX files under ``raw_dir`` (or the hub copy) into a saved DatasetDict at ``out_dir``."""
    raw_dir = Path(raw_dir)
    if (raw_dir / "train-images-idx3-ubyte.gz").exists():
        tr_x = read_idx(raw_dir / "train-images-idx3-ubyte.gz")
        tr_y = read_idx(raw_dir / "train-labels-idx1-ubyte.gz")
        te_x = read_idx(raw_dir / "t10k-images-idx3-ubyte.gz")
        te_y = read_idx(raw_dir / "t10k-labels-idx1-ubyte.gz")
    else:
        try:
            hub = datasets.load_dataset(FASHION_MNIST.hub_name)
        except Exception as err:
            raise FileNotFoundError(
                f"Fashion-MNIST not found: {raw_dir} is missing (apt-get install dataset-fashion-mnist) "
                f"and the hub copy {FASHION_MNIST.hub_name!r} could not be loaded: {err}"
            ) from err
        tr_x = np.stack([np.asarray(im) for im in hub["train"]["image"]])
        tr_y = np.asarray(hub["train"]["label"])
        te_x = np.stack([np.asarray(im) for im in hub["test"]["image"]])
        te_y = np.asarray(hub["test"]["label"])
    train_rows, val_rows = _split_val(tr_x, tr_y)

    def make(x: np.ndarray, y: np.ndarray) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"image": list(x), "label": y.astype(int).tolist()}, features=_features()
        )

    dd = datasets.DatasetDict(
        {
            "train": make(tr_x[train_rows], tr_y[train_rows]),
            "val": make(tr_x[val_rows], tr_y[val_rows]),
            "test": make(te_x, te_y),
        }
    )
    out_dir = Path(out_dir)
    # A scratch folder of this builder's own: DDP ranks or two runs that found no dataset at once each
    # build one, and never write into (or rename away) another's half-written copy.
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        dd.save_to_disk(str(tmp))
        try:
            tmp.rename(out_dir)  # atomic: a reader sees no dataset or a whole one
        except OSError:
            if not (out_dir / "dataset_dict.json").is_file():
                raise
            # another builder published first: the same files, so theirs is used and ours dropped
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(out_dir))


def fashion_mnist_dir(root: str | Path = "data") -> Path:
    """The saved demo dataset directory under ``root``, built on first use."""
    out = Path(root) / "fashion_mnist"
    if not (out / "dataset_dict.json").exists():
        build_fashion_mnist(out)
    return out
