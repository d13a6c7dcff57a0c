"""Shared fixtures: offline mode, the tiny demo models, the demo data, an image folder of real photos.

The product loads models from paths; the tiny random-weight ones are built here once per session with
the builders of :mod:`cascadevlm.zoo` and handed to tests as paths.
"""

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
from cascadevlm.zoo.tiny_lvlm import build_tiny_llava, build_tiny_qwen2vl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Two classes of real photos; grayscale ones included so RGB conversion is exercised.
PHOTO_CLASSES = {
    "animal": ["chelsea", "horse"],
    "person": ["astronaut", "grace_hopper"],
    "object": ["coffee", "rocket", "coins"],
}


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> Path:
    """The tiny random-weight CLIP checkpoint (``cascadevlm-tiny-vit``, seed 0)."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), TINY_CLIP, seed=0)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """The tiny random-weight LLaVA, a model directory."""
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tmp_path_factory) -> Path:
    """The tiny random-weight Qwen2-VL, a model directory."""
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"))


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


@pytest.fixture
def text_calls(monkeypatch):
    """Counts open_clip text-encoder forwards (a zero-shot head cache hit makes none)."""
    import open_clip

    calls = []
    real = open_clip.model.CLIP.encode_text
    monkeypatch.setattr(open_clip.model.CLIP, "encode_text", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls
