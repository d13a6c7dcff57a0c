"""Backends built from configs/lvlm/*.yaml (cascadevlm/lvlm/config.py), as evaluate.py builds them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lvlm_fixtures import llava_dir, photos, qwen2vl_dir  # noqa: F401

from cascadevlm.lvlm.api_backend import OpenAIBackend
from cascadevlm.lvlm.base import LVLMRequest
from cascadevlm.lvlm.config import load_backend
from cascadevlm.lvlm.prompts import build_prompt
from cascadevlm.lvlm.transformers_backend import TransformersBackend

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "lvlm"
BACKEND_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("lora_"))


@pytest.mark.parametrize("path", BACKEND_CONFIGS, ids=lambda p: p.name)
def test_every_backend_config_builds(path):
    backend = load_backend(path)  # nothing is loaded or called yet
    kind = yaml.safe_load(path.read_text())["class_path"].rsplit(".", 1)[1]
    assert type(backend).__name__ == kind
    if isinstance(backend, OpenAIBackend):
        assert backend.api_key_env.endswith("_API_KEY") and backend.cache_path
    assert backend.calls == 0


@pytest.mark.parametrize(
    "name,fixture", [("tiny_llava_score.yaml", "llava_dir"), ("tiny_qwen2vl_generate.yaml", "qwen2vl_dir")]
)
def test_tiny_configs_choose(name, fixture, photos, request):  # noqa: F811
    model_dir = request.getfixturevalue(fixture)
    backend = load_backend(CONFIGS / name, model=str(model_dir), build_tiny=None, device="cpu")
    assert isinstance(backend, TransformersBackend)
    reqs = [
        LVLMRequest(image=photos[n], candidates=[n, "coins", "galaxy"], fallback=1) for n in ["cat", "horse"]
    ]
    answers = backend.choose(reqs)
    assert len(answers) == 2 and backend.calls == 2
    if backend.mode == "score":
        assert all(
            a.scores is not None and a.choice == max(range(3), key=a.scores.__getitem__) for a in answers
        )
    else:  # random weights: gibberish is parsed or falls back, never raises
        assert all(a.fallback in (None, "unparseable") for a in answers)
    # dataset-aware wording from the registry: Fashion-MNIST's classes are clothing items
    text = backend.encoder.render(build_prompt(reqs[0], backend.prompt).messages)
    assert "Which of these clothing items is shown in the image?" in text


def test_build_tiny_writes_the_model_on_first_use(tmp_path, photos):  # noqa: F811
    target = tmp_path / "tiny"
    backend = TransformersBackend(str(target), build_tiny="llava", device="cpu")
    assert not target.exists()
    (answer,) = backend.choose([LVLMRequest(image=photos["cat"], candidates=["cat", "horse"])])
    assert (target / "config.json").exists() and len(answer.scores) == 2


@pytest.mark.parametrize("option", ["min_pixels", "max_pixels"])
def test_non_positive_pixel_limits_are_refused_when_the_backend_is_built(option):
    with pytest.raises(ValueError) as err:
        TransformersBackend(model="not-loaded-yet", **{option: -1})
    assert str(err.value) == f"lvlm.init_args.{option} must be >= 1 or null, got -1"
