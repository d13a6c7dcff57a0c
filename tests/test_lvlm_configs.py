"""Backends built from configs/lvlm/*.yaml (cascadevlm/lvlm/config.py), as evaluate.py builds them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lvlm_fixtures import llava_dir, llava_lora_dir, photos, qwen2vl_dir  # noqa: F401

from cascadevlm.errors import project_error
from cascadevlm.lvlm.api_backend import OpenAIBackend
from cascadevlm.lvlm.base import LVLMRequest
from cascadevlm.lvlm.config import load_backend
from cascadevlm.lvlm.prompts import build_prompt
from cascadevlm.lvlm.transformers_backend import TransformersBackend

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "lvlm"
BACKEND_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("lora_"))


def _local_model(path: Path, request) -> dict:
    """The tiny demo configs name ``artifacts/tiny_lvlm/<kind>``, written by hand, and a LoRA adapter
    that train.py writes; tests pass their own (the backend checks both folders when it is built)."""
    init_args = yaml.safe_load(path.read_text())["init_args"]
    model = init_args.get("model", "")
    out = {}
    if model.startswith("artifacts/tiny_lvlm/"):
        out["model"] = str(request.getfixturevalue(f"tiny_{model.rsplit('/', 1)[1]}_dir"))
    if init_args.get("lora_path") and "model" in out:
        out["lora_path"] = str(request.getfixturevalue("llava_lora_dir"))
    elif init_args.get("lora_path"):  # a committed model (the demo LLaVA): an adapter made for it
        out["lora_path"] = str(_untrained_adapter(REPO / model, request))
    return out


def _untrained_adapter(model_dir: Path, request) -> Path:
    """A LoRA adapter (peft's save_pretrained, untrained) for ``model_dir``: what train.py writes for it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    out = request.getfixturevalue("tmp_path") / "lora"
    net = AutoModelForImageTextToText.from_pretrained(model_dir)
    get_peft_model(net, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(out)
    return out


@pytest.mark.parametrize("path", BACKEND_CONFIGS, ids=lambda p: p.name)
def test_every_backend_config_builds(path, request):
    backend = load_backend(path, **_local_model(path, request))  # nothing is loaded or called yet
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
    backend = load_backend(CONFIGS / name, model=str(model_dir), device="cpu")
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


def test_a_missing_model_directory_is_refused_in_one_line_when_the_backend_is_built(tmp_path):
    target = tmp_path / "tiny" / "llava"
    with pytest.raises(FileNotFoundError) as err:
        TransformersBackend(str(target), device="cpu")
    assert str(err.value) == (
        f"LVLM model directory {str(target)!r} does not exist; set lvlm.init_args.model to a model directory "
        "or a Hugging Face hub id (org/name)"
    )
    assert not target.exists()  # the product never writes a model
    with pytest.raises(ValueError) as err:  # jsonargparse wraps it; the entry points print the refusal itself
        load_backend(CONFIGS / "tiny_llava_score.yaml", model="artifacts/nope/llava")
    assert str(project_error(err.value)).startswith(
        "LVLM model directory 'artifacts/nope/llava' does not exist"
    )
    # an org/name hub id is left to transformers
    assert TransformersBackend("some-org/some-model").model_name == "some-org/some-model"


def test_from_model_wraps_a_model_in_memory_whose_name_is_no_path(llava_dir, photos, tmp_path):  # noqa: F811
    """bench/realsize.py names an in-memory model "Qwen2-VL-2B-Instruct [4/28 text ...]": no path check."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    net = AutoModelForImageTextToText.from_pretrained(llava_dir)
    processor = AutoProcessor.from_pretrained(llava_dir)
    backend = TransformersBackend.from_model(
        net, processor, model="LLaVA [2/32 text, 1/24 vision layers]", device="cpu"
    )
    assert backend.model_name == "LLaVA [2/32 text, 1/24 vision layers]"
    answers = backend.choose([LVLMRequest(image=photos["cat"], candidates=["cat", "coins"], fallback=0)])
    assert len(answers) == 1 and answers[0].scores is not None
    with pytest.raises(
        FileNotFoundError,
        match="LVLM model directory 'LLaVA \\[2/32 text, 1/24 vision layers\\]' does not exist",
    ):
        TransformersBackend(
            model="LLaVA [2/32 text, 1/24 vision layers]"
        )  # the path check still holds outside from_model


@pytest.mark.parametrize("option", ["min_pixels", "max_pixels"])
def test_non_positive_pixel_limits_are_refused_when_the_backend_is_built(option):
    with pytest.raises(ValueError) as err:
        TransformersBackend(model="not-loaded-yet", **{option: -1})
    assert str(err.value) == f"lvlm.init_args.{option} must be >= 1 or null, got -1"


def test_evaluate_refuses_a_missing_model_directory_in_one_line(
    tiny_clip_path, photo_folder, tmp_path, capsys
):
    from cascadevlm.cli import evaluate_main

    with pytest.raises(SystemExit) as done:
        evaluate_main([
            "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
            "--data.dataset", str(photo_folder), "--trainer.accelerator", "cpu",
            "--lvlm.class_path", "cascadevlm.lvlm.transformers_backend.TransformersBackend",
            "--lvlm.init_args.model", str(tmp_path / "no" / "llava"),
            "--output_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"),
        ])  # fmt: skip
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: LVLM model directory {str(tmp_path / 'no' / 'llava')!r} does not exist; set lvlm.init_args.model "
        "to a model directory or a Hugging Face hub id (org/name)"
    ]
    assert not (tmp_path / "runs").exists()


def test_reasoning_prompt_is_in_the_fingerprint_and_sizes_the_answer_length():
    """``prompt.reasoning`` changes the prompt, so the answer fingerprint (run name, resume) and the API
    cache key; unset lengths grow for the explanation (16 -> 512 local, 32 -> 512 API)."""
    from cascadevlm.lvlm.prompts import PromptConfig, user_text

    short = TransformersBackend("not-loaded-yet", mode="generate")
    reasoning = TransformersBackend("not-loaded-yet", mode="generate", prompt=PromptConfig(reasoning=True))
    assert (short.max_new_tokens, reasoning.max_new_tokens) == (16, 512)
    assert short.answer_fingerprint() != reasoning.answer_fingerprint()
    assert reasoning.answer_fingerprint()["prompt"]["reasoning"] is True
    # at their defaults the new settings leave the fingerprint of runs made before them as it was
    # (run names, resume, answer store): the prompt without reasoning keys, the length used (16)
    fp = TransformersBackend("not-loaded-yet", mode="generate", prompt=PromptConfig()).answer_fingerprint()
    assert not {"reasoning", "letter_reasoning_instruction", "name_reasoning_instruction"} & set(fp["prompt"])
    assert (fp["max_new_tokens"], reasoning.answer_fingerprint()["max_new_tokens"]) == (16, 512)
    set_length = TransformersBackend(
        "not-loaded-yet", mode="generate", prompt=PromptConfig(reasoning=True), max_new_tokens=200
    )
    assert set_length.max_new_tokens == 200
    api = [
        OpenAIBackend(
            model="m", base_url="http://localhost:1/v1", api_key_env=None, prompt=PromptConfig(reasoning=r)
        )
        for r in (False, True)
    ]
    assert [a.max_tokens for a in api] == [32, 512]
    assert [a.answer_fingerprint()["max_tokens"] for a in api] == [32, 512]
    assert api[0].answer_fingerprint() != api[1].answer_fingerprint()
    req = LVLMRequest(image=photos_stub(), candidates=["cat", "horse"], key="k")
    keys = [a.request_key(req, build_prompt(req, a.prompt)) for a in api]
    assert keys[0] != keys[1]
    text = user_text(PromptConfig(reasoning=True), ["cat", "horse"])
    assert text.endswith(
        "Then end with a final line of the form 'Answer: X', where X is the letter of the option shown."
    )
    named = user_text(PromptConfig(reasoning=True, options="names"), ["cat", "horse"])
    assert "'Answer: <name>', with the option's name as written above." in named


def photos_stub():
    from PIL import Image

    return Image.new("RGB", (8, 8))


def test_reasoning_is_refused_in_score_mode_and_with_a_length_that_cuts_it():
    from cascadevlm.lvlm.prompts import PromptConfig

    with pytest.raises(ValueError) as err:
        TransformersBackend("not-loaded-yet", mode="score", prompt=PromptConfig(reasoning=True))
    assert str(err.value) == (
        "lvlm.init_args.prompt.reasoning asks the model to explain before answering, which only generate "
        "mode reads: set lvlm.init_args.mode generate, or prompt.reasoning false (mode is 'score')"
    )
    with pytest.raises(ValueError) as err:
        TransformersBackend(
            "not-loaded-yet", mode="generate", prompt=PromptConfig(reasoning=True), max_new_tokens=16
        )
    assert str(err.value) == (
        "lvlm.init_args.max_new_tokens 16 cuts a reasoning answer before its final 'Answer:' line: leave it "
        "unset (512) or set it to at least 64"
    )
    with pytest.raises(ValueError, match="lvlm.init_args.max_tokens 32 cuts a reasoning answer"):
        OpenAIBackend(
            model="m", base_url="http://localhost:1/v1", prompt=PromptConfig(reasoning=True), max_tokens=32
        )
