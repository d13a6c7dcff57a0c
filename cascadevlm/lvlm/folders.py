"""Checks of a local LVLM folder and its LoRA adapter folder, made when the backend is built (before any
work): each problem is one line naming the file and the option that fixes it, instead of a transformers,
safetensors or peft traceback after the CLIP stage.

* the model folder: ``config.json`` (an image folder or an empty folder has none), weights that
  safetensors can open (junk or a truncated download is named), every shard its index lists, and the
  tokenizer's vocabulary files (without them transformers asks to install sentencepiece);
* the LoRA folder: it exists, holds peft's ``adapter_config.json`` and readable adapter weights, and
  was made for this model: the base model class peft records (``auto_mapping.base_model_class``)
  against the model's ``architectures``, and, when the recorded base folder is here, its
  ``config.json`` against the model's (a LLaVA adapter on Qwen2-VL loads without a word in peft when
  the module names match, and changes answers).
"""

from __future__ import annotations

import json
from pathlib import Path

# Files that hold a tokenizer's vocabulary (fast tokenizer, SentencePiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# config.json keys that name or date a copy, not the model: left out when two configs are compared.
_VOLATILE = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "architectures"}


def _read_json(path: Path, option: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}); restore it or set {option}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object; restore it or set {option}")
    return data


def check_safetensors(path: Path, option: str) -> None:
    """Refuse a ``.safetensors`` file safetensors cannot open (junk, text, a truncated download)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as error:  # SafetensorError and OSError: the reason is in the message
        reason = str(error).removeprefix("Error while deserializing header: ")
        raise ValueError(
            f"{path} is not a complete safetensors file ({reason}): download or copy it again, or set "
            f"{option} to another folder"
        ) from None


def _has_images(folder: Path, look: int = 1000) -> bool:
    """Whether ``folder`` holds images (a dataset folder, not a model), among its first ``look`` entries."""
    from itertools import islice

    return any(p.suffix.lower() in _IMAGE_SUFFIXES for p in islice(folder.rglob("*"), look))


def check_model_folder(folder: str | Path, option: str = "lvlm.init_args.model") -> None:
    """Refuse a local LVLM folder transformers cannot load (see the module doc); ``option`` sets it."""
    folder = Path(folder).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        what = (
            "it holds images: a dataset folder, not a model" if _has_images(folder) else "not a model folder"
        )
        raise ValueError(
            f"LVLM folder {str(folder)!r} has no config.json ({what}); set {option} to a folder that "
            "save_pretrained wrote (config.json, *.safetensors, tokenizer and processor files) or a hub id"
        )
    _read_json(config, option)
    index = folder / "model.safetensors.index.json"
    shards = sorted(folder.glob("*.safetensors"))
    if index.is_file():
        for name in sorted(set(_read_json(index, option).get("weight_map", {}).values())):
            if not (folder / name).is_file():
                raise ValueError(
                    f"{folder / name} is missing ({index.name} lists it): download or copy it again, or "
                    f"set {option} to another folder"
                )
    if not shards and not any(folder.glob("*.bin")) and not any(folder.glob("*.pt")):
        raise ValueError(
            f"LVLM folder {str(folder)!r} has no weights (*.safetensors); copy them into it or set {option}"
        )
    for shard in shards:
        check_safetensors(shard, option)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not any(folder.glob("*.tiktoken")):
        raise ValueError(
            f"LVLM folder {str(folder)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): "
            f"copy them from the model's release (processor.save_pretrained writes them) or set {option}"
        )


def check_lora_folder(folder: str | Path, model: str, option: str = "lvlm.init_args.lora_path") -> None:
    """Refuse a LoRA folder that is missing, is no peft adapter, or was made for another model than
    ``model`` (a local folder or hub id; see the module doc)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"LoRA folder {str(folder)!r} does not exist; set {option} to a folder with adapter_config.json "
            "(peft's save_pretrained, train.py's lora_adapter), or null"
        )
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        full = (
            " (it is a whole model: set lvlm.init_args.model to it instead)"
            if (folder / "config.json").is_file()
            else ""
        )
        raise ValueError(
            f"LoRA folder {str(folder)!r} has no adapter_config.json, so it is no peft adapter{full}; set "
            f"{option} to a folder that peft's save_pretrained wrote, or null"
        )
    adapter = _read_json(config_file, option)
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors(weights, option)
    elif not (folder / "adapter_model.bin").is_file():
        raise ValueError(
            f"LoRA folder {str(folder)!r} has no adapter_model.safetensors; copy it into the folder or set {option}"
        )
    _check_lora_base(folder, adapter, model, option)


def _check_lora_base(folder: Path, adapter: dict, model: str, option: str) -> None:
    """The adapter's recorded base model against ``model``: its class, and its config when both are here."""
    model_dir = Path(model).expanduser()
    model_config = (
        json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else None
    )
    base_class = (adapter.get("auto_mapping") or {}).get("base_model_class")
    base_path = adapter.get("base_model_name_or_path")
    made_for = f"{base_class or 'a model'} ({base_path})" if base_path else (base_class or "another model")
    refuse = ValueError(
        f"LoRA adapter {str(folder)!r} was made for {made_for}, not for {model!r}"
        f"{' (' + ', '.join(model_config.get('architectures') or []) + ')' if model_config else ''}: set {option} "
        "to an adapter trained on this model, or lvlm.init_args.model to the adapter's base model"
    )
    if model_config is None:  # a hub id: its class and config are not here to compare
        return
    architectures = model_config.get("architectures") or []
    if base_class and architectures and base_class not in architectures:
        raise refuse
    base_dir = Path(base_path).expanduser() if base_path else None
    if (
        base_dir is not None
        and (base_dir / "config.json").is_file()
        and base_dir.resolve() != model_dir.resolve()
    ):
        base_config = json.loads((base_dir / "config.json").read_text())
        if _comparable(base_config) != _comparable(model_config):
            raise refuse


def _comparable(config: dict) -> dict:
    """A config.json without the keys that name or date a copy (nested configs too)."""
    return {k: _comparable(v) if isinstance(v, dict) else v for k, v in config.items() if k not in _VOLATILE}
