"""Bad LVLM and LoRA folders are refused in one line when the backend is built, naming the file and the
option (cascadevlm/lvlm/folders.py), and evaluate.py exits 2 with that line before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from lvlm_fixtures import llava_dir, llava_lora_dir, photos, qwen2vl_dir  # noqa: F401

from cascadevlm.lvlm.transformers_backend import TransformersBackend

MODEL = "lvlm.init_args.model"
LORA = "lvlm.init_args.lora_path"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _junk_weights(d: Path) -> str:
    (d / "model.safetensors").write_text("this is not a safetensors file, only a line of text\n" * 40)
    return (
        f"{d / 'model.safetensors'} is not a complete safetensors file (header too large): download or copy "
        f"it again, or set {MODEL} to another folder"
    )


def _truncated_weights(d: Path) -> str:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return (
        f"{d / 'model.safetensors'} is not a complete safetensors file (incomplete metadata, file not fully "
        f"covered): download or copy it again, or set {MODEL} to another folder"
    )


def _missing_shard(d: Path) -> str:
    index = {
        "metadata": {},
        "weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return (
        f"{d / 'model-00002-of-00002.safetensors'} is missing (model.safetensors.index.json lists it): "
        f"download or copy it again, or set {MODEL} to another folder"
    )


def _no_config(d: Path) -> str:
    (d / "config.json").unlink()
    return (
        f"LVLM folder {str(d)!r} has no config.json (not a model folder); set {MODEL} to a folder that "
        "save_pretrained wrote (config.json, *.safetensors, tokenizer and processor files) or a hub id"
    )


def _no_tokenizer(d: Path) -> str:
    (d / "tokenizer.json").unlink()
    return (
        f"LVLM folder {str(d)!r} has no tokenizer files (tokenizer.json, tokenizer.model, spiece.model, ...): "
        f"copy them from the model's release (processor.save_pretrained writes them) or set {MODEL}"
    )


BROKEN = {
    "junk safetensors": _junk_weights,
    "truncated safetensors": _truncated_weights,
    "missing shard": _missing_shard,
    "no config.json": _no_config,
    "no tokenizer files": _no_tokenizer,
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_model_folder_is_refused_naming_the_file(case, llava_dir, tmp_path):  # noqa: F811
    folder = _copy(llava_dir, tmp_path / "llava")
    expected = BROKEN[case](folder)
    with pytest.raises(ValueError) as err:
        TransformersBackend(str(folder), device="cpu")
    assert str(err.value) == expected


def test_an_image_folder_as_the_model_is_refused(photo_folder):
    with pytest.raises(ValueError) as err:
        TransformersBackend(str(photo_folder), device="cpu")
    assert str(err.value) == (
        f"LVLM folder {str(photo_folder)!r} has no config.json (it holds images: a dataset folder, not a "
        f"model); set {MODEL} to a folder that save_pretrained wrote (config.json, *.safetensors, tokenizer "
        "and processor files) or a hub id"
    )


def test_lora_folders_missing_not_an_adapter_or_broken_are_refused(llava_dir, llava_lora_dir, tmp_path):  # noqa: F811
    missing = tmp_path / "no_such_lora"
    with pytest.raises(FileNotFoundError) as err:
        TransformersBackend(str(llava_dir), lora_path=str(missing))
    assert str(err.value) == (
        f"LoRA folder {str(missing)!r} does not exist; set {LORA} to a folder with adapter_config.json "
        "(peft's save_pretrained, train.py's lora_adapter), or null"
    )
    with pytest.raises(ValueError) as err:  # the model folder itself given as the adapter
        TransformersBackend(str(llava_dir), lora_path=str(llava_dir))
    assert str(err.value) == (
        f"LoRA folder {str(llava_dir)!r} has no adapter_config.json, so it is no peft adapter (it is a whole "
        f"model: set {MODEL} to it instead); set {LORA} to a folder that peft's save_pretrained wrote, or null"
    )
    broken = _copy(llava_lora_dir, tmp_path / "broken_lora")
    (broken / "adapter_model.safetensors").write_bytes(b"\0" * 3)
    with pytest.raises(ValueError) as err:
        TransformersBackend(str(llava_dir), lora_path=str(broken))
    assert str(err.value) == (
        f"{broken / 'adapter_model.safetensors'} is not a complete safetensors file (header too small): "
        f"download or copy it again, or set {LORA} to another folder"
    )


def test_a_lora_made_for_another_model_is_refused(llava_dir, qwen2vl_dir, llava_lora_dir, photos):  # noqa: F811
    """A LLaVA adapter on Qwen2-VL: peft loads it (the module names match) and answers change."""
    with pytest.raises(ValueError) as err:
        TransformersBackend(str(qwen2vl_dir), lora_path=str(llava_lora_dir))
    assert str(err.value) == (
        f"LoRA adapter {str(llava_lora_dir)!r} was made for LlavaForConditionalGeneration ({llava_dir}), not for "
        f"{str(qwen2vl_dir)!r} (Qwen2VLForConditionalGeneration): set {LORA} to an adapter trained on this "
        f"model, or {MODEL} to the adapter's base model"
    )
    from cascadevlm.lvlm.base import LVLMRequest

    ok = TransformersBackend(
        str(llava_dir), lora_path=str(llava_lora_dir), device="cpu"
    )  # its own base model
    (answer,) = ok.choose([LVLMRequest(image=photos["cat"], candidates=["cat", "horse"], fallback=0)])
    assert answer.scores is not None


def test_a_lora_whose_base_folder_has_another_config_is_refused(llava_dir, llava_lora_dir, tmp_path):  # noqa: F811
    """Same class (LLaVA), other dimensions: the recorded base folder's config.json differs."""
    other = _copy(llava_dir, tmp_path / "llava_wide")
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 256
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"^LoRA adapter {str(llava_lora_dir)!r} was made for Llava"):
        TransformersBackend(str(other), lora_path=str(llava_lora_dir))


@pytest.mark.parametrize("case", ["truncated safetensors", "no tokenizer files", "lora for another model"])
def test_evaluate_exits_2_with_one_line(
    case,
    tiny_clip_path,
    photo_folder,
    tiny_llava_dir,
    tiny_qwen2vl_dir,
    llava_lora_dir,  # noqa: F811
    tmp_path,
    capsys,
):
    from cascadevlm.cli import evaluate_main

    if case == "lora for another model":
        model, extra = tiny_qwen2vl_dir, ["--lvlm.init_args.lora_path", str(llava_lora_dir)]
        expected = f"LoRA adapter {str(llava_lora_dir)!r} was made for LlavaForConditionalGeneration"
    else:
        model, extra = _copy(tiny_llava_dir, tmp_path / "llava"), []
        expected = BROKEN[case](model)
    with pytest.raises(SystemExit) as done:
        evaluate_main([
            "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
            "--data.dataset", str(photo_folder), "--trainer.accelerator", "cpu", "--cascade.topk", "2",
            "--lvlm.class_path", "cascadevlm.lvlm.transformers_backend.TransformersBackend",
            "--lvlm.init_args.model", str(model), *extra,
            "--output_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"),
        ])  # fmt: skip
    assert done.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), lines
    assert not (tmp_path / "runs").exists()  # refused before any work
