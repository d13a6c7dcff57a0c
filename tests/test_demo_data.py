"""cascadevlm.data.demo: building the Fashion-MNIST demo dataset, also by two processes at once."""

from __future__ import annotations

import gzip

import datasets
import numpy as np

from cascadevlm.data import demo


def _idx(path, arr: np.ndarray) -> None:
    """Write ``arr`` (uint8) as a gzipped IDX file, the format ``read_idx`` reads."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def _raw(tmp_path):
    """A Fashion-MNIST raw folder of 3 train and 1 test image per class (the real files' layout)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("t10k", 1)):
        labels = np.repeat(np.arange(10), per_class)
        _idx(raw / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (len(labels), 28, 28)))
        _idx(raw / f"{split}-labels-idx1-ubyte.gz", labels)
    return raw


def test_two_processes_building_the_demo_data_at_once_both_get_it(tmp_path, monkeypatch):
    # Two DDP ranks (torchrun starts them together) or two runs find no dataset and both build it. The
    # other builder is replayed in this process: it builds and publishes the whole dataset while this
    # one is between writing its copy and renaming it into place. Both used one "<out>.tmp" folder:
    # the second rename found it gone (FileNotFoundError), or found the other's folder in place.
    monkeypatch.setattr(demo, "VAL_PER_CLASS", 1)
    raw, out = _raw(tmp_path), tmp_path / "data" / "fashion_mnist"
    out.parent.mkdir()
    real_save, other = datasets.DatasetDict.save_to_disk, []

    def save_then_the_other_builds(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)
        if not other:
            other.append(None)
            other[0] = demo.build_fashion_mnist(out, raw)

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", save_then_the_other_builds)
    mine = demo.build_fashion_mnist(out, raw)
    monkeypatch.undo()
    assert other[0] is not None
    for split, rows in (("train", 20), ("val", 10), ("test", 10)):
        assert len(mine[split]) == rows and mine[split]["label"] == other[0][split]["label"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["fashion_mnist"]  # no scratch folder left
    assert datasets.load_from_disk(str(out))["train"]["label"] == mine["train"]["label"]
