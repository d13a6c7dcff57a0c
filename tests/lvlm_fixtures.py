"""Shared fixtures for the LVLM tests: photos by class, a photo dataset, the tiny LVLMs by short name.

Import the fixtures by name into a test module (``from lvlm_fixtures import llava_dir``). The tiny
models themselves are conftest's session fixtures ``tiny_llava_dir`` / ``tiny_qwen2vl_dir``; the tiny
Gemma 3 is built here (only the tests that import ``gemma3_dir`` pay for it).
"""

from __future__ import annotations

import pytest

from cascadevlm.testing.images import sample_photos

# Class names for the sample photos: the k-shot "dataset" of the LVLM tests.
PHOTO_CLASSES = {
    "astronaut": "astronaut",
    "chelsea": "cat",
    "coffee": "coffee",
    "rocket": "rocket",
    "camera": "camera",
    "horse": "horse",
    "coins": "coins",
    "hubble_deep_field": "galaxy",
    "china": "china",
    "flower": "flower",
    "grace_hopper": "portrait",
}


@pytest.fixture(scope="session")
def photos():
    """Real photos by class name, RGB."""
    return {PHOTO_CLASSES[k]: v.convert("RGB") for k, v in sample_photos().items()}


@pytest.fixture(scope="session")
def llava_dir(tiny_llava_dir):
    return tiny_llava_dir


@pytest.fixture(scope="session")
def qwen2vl_dir(tiny_qwen2vl_dir):
    return tiny_qwen2vl_dir


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory):
    """The tiny random-weight Gemma 3 (the scorer's two-forward path), a model directory."""
    from cascadevlm.zoo.tiny_lvlm import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"))


@pytest.fixture(scope="session")
def gemma3_short_window_dir(tmp_path_factory):
    """The tiny Gemma 3 with a 24-token sliding window: every cascade prompt is longer."""
    from cascadevlm.zoo.tiny_lvlm import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3_w24"), sliding_window=24)


@pytest.fixture(scope="session")
def llava_lora_dir(tiny_llava_dir, tmp_path_factory):
    """A LoRA adapter made (peft's save_pretrained, untrained) for the tiny LLaVA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    net = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir)
    out = tmp_path_factory.mktemp("llava_lora")
    get_peft_model(net, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(out)
    return out


@pytest.fixture(scope="session", params=["llava", "qwen2vl"])
def tiny_lvlm_dir(request):
    """Each tiny architecture in turn."""
    return request.getfixturevalue(f"{request.param}_dir")


def disable_hf_progress() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


disable_hf_progress()


@pytest.fixture(scope="session")
def photo_dataset(tmp_path_factory, photos):
    """A ``save_to_disk`` dataset of the real photos: ``train`` has two views per class (the photo and
    its mirror image), ``val`` one (a centre crop); plus a k=2 split file. Returns (dir, split path)."""
    import datasets
    from PIL import ImageOps

    from cascadevlm.data.kshot import sample_kshot

    names = sorted(photos)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    train = {"image": [], "label": []}
    val = {"image": [], "label": []}
    for c, name in enumerate(names):
        img = photos[name].resize((64, 64))
        train["image"] += [img, ImageOps.mirror(img)]
        train["label"] += [c, c]
        w, h = photos[name].size
        val["image"].append(photos[name].crop((w // 8, h // 8, w - w // 8, h - h // 8)).resize((64, 64)))
        val["label"].append(c)
    dsd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(train, features=features),
            "val": datasets.Dataset.from_dict(val, features=features),
        }
    )
    root = tmp_path_factory.mktemp("photo_dataset")
    dsd.save_to_disk(str(root / "data"))
    split = sample_kshot(train["label"], k=2, seed=0, dataset="photos", num_classes=len(names))
    return root / "data", split.save(root / "photos_k2_seed0.json")
