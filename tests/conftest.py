"""Shared fixtures: offline mode, a tiny CLIP checkpoint, the demo data, an image folder of real photos."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cascadevlm.testing.images import sample_photos  # noqa: E402
from cascadevlm.zoo.tiny_clip import TINY_CLIP, build_tiny_clip  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Two classes of real photos; grayscale ones included so RGB conversion is exercised.
PHOTO_CLASSES = {
    "animal": ["chelsea", "horse"],
    "person": ["astronaut", "grace_hopper"],
    "object": ["coffee", "rocket", "coins"],
}


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), TINY_CLIP, seed=0)


@pytest.fixture(scope="session")
def tiny_clip_bundle(tiny_clip_path):
    from cascadevlm.clip.model import load_clip

    return load_clip(TINY_CLIP, str(tiny_clip_path))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Where the Fashion-MNIST demo dataset is built once per test session."""
    from cascadevlm.data.demo import fashion_mnist_dir

    root = tmp_path_factory.mktemp("data")
    fashion_mnist_dir(root)
    return root


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """An image folder ``<root>/<split>/<class>/<name>.jpg`` of real photos (train and test splits)."""
    root = tmp_path_factory.mktemp("photos")
    photos = sample_photos()
    for split in ("train", "test"):
        for cls, names in PHOTO_CLASSES.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for name in names:
                img = photos[name]
                img.thumbnail((96, 96))
                img.save(d / f"{name}.jpg", quality=90)
    return root


@pytest.fixture
def clean_fake_lvlm():
    """The offline FakeLVLM's request log and failure set, empty before and after a test."""
    from cascadevlm.testing.fake_lvlm import FakeLVLM

    FakeLVLM.log.clear()
    FakeLVLM.fail_keys = set()
    yield FakeLVLM
    FakeLVLM.log.clear()
    FakeLVLM.fail_keys = set()
