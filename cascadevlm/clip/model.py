"""Loading open_clip models by architecture and `pretrained` tag or checkpoint path."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from cascadevlm.provenance import check_manifest, file_sha256, read_provenance

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


def register_model_configs() -> None:
    """Add the project's own model configs (tiny ones for offline tests) to open_clip's registry."""
    known = set(open_clip.list_models())
    if any(p.stem not in known for p in MODEL_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


# open_clip's precision names. "amp*" keep fp32 weights and run the image encoder under autocast.
PRECISIONS = ("fp32", "fp16", "bf16", "amp", "amp_bf16", "amp_bfloat16", "pure_fp16", "pure_bf16")
AUTOCAST_DTYPES = {"amp": torch.float16, "amp_bf16": torch.bfloat16, "amp_bfloat16": torch.bfloat16}
# Files in a weights directory that do not change the model (our own provenance mark, VCS/OS clutter).
_NOT_WEIGHTS = ("cascadevlm_provenance.json", ".DS_Store")


def dir_sha256(path: str | Path) -> str:
    """Content hash of every file under a directory (names and contents; symlinks followed).

    A new, changed or removed file gives a new hash. The provenance mark and hidden files are left out.
    """
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if f.name in _NOT_WEIGHTS or any(part.startswith(".") for part in f.relative_to(root).parts):
            continue
        h.update(f"{rel}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def hf_hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot directory of a hub repo if it is in the HF cache (never downloads), else None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or huggingface_hub unavailable: the caller falls back to the name
        return None


def weights_id(pretrained: str | None, model_name: str | None = None) -> str:
    """Identifies the weights for cache keys and adapters, by content wherever the files are local.

    - ``local-dir:<dir>`` models: ``sha256-dir:`` hash of every file in the directory (config + weights);
    - ``hf-hub:<org/repo>`` models: the same hash of the repo's snapshot in the local HF cache; when it
      cannot be resolved offline, ``hf-hub:<org/repo>@unresolved`` (identified by name only);
    - a checkpoint file: ``sha256:`` its content hash; an open_clip tag: the tag; nothing: ``random-init``.
    """
    if model_name and model_name.startswith("local-dir:"):
        return "sha256-dir:" + dir_sha256(model_name.removeprefix("local-dir:"))
    if model_name and model_name.startswith("hf-hub:"):
        repo = model_name.removeprefix("hf-hub:")
        snap = hf_hub_snapshot(repo)
        return f"sha256-dir:{dir_sha256(snap)}" if snap is not None else f"hf-hub:{repo}@unresolved"
    if not pretrained:
        return "random-init"
    if os.path.isfile(pretrained):
        return "sha256:" + file_sha256(pretrained)
    return pretrained


def config_id(model_name: str) -> str:
    """Hash of the open_clip model config of a registered architecture ("" for hub/local-dir models,
    whose config file is part of their weights id)."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return ""
    cfg = open_clip.get_model_config(model_name)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16] if cfg else ""


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype images must have for ``model.encode_image``: that of the image tower's first layer."""
    visual = getattr(model, "visual", model)
    for m in visual.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            return m.weight.dtype
    return next(visual.parameters()).dtype


def encode_images(bundle: ClipBundle, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised float32 image features of preprocessed ``pixels`` [B, 3, H, W] under ``bundle``.

    Images are cast to the model's dtype (bf16/fp16 models) and put on its device. The numeric precision
    is the bundle's own (``model.precision``): an autocast opened by the caller (Lightning's
    ``trainer.precision``) is switched off here, so the features (and the feature-cache key, which holds
    the bundle's precision) never depend on it. ``amp``/``amp_bf16`` run the encoder under autocast.
    """
    model = bundle.model
    device = next(model.parameters()).device
    x = pixels.to(device=device, dtype=input_dtype(model))
    amp = AUTOCAST_DTYPES.get(bundle.precision)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        return model.encode_image(x, normalize=True).float()


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


@dataclass
class ClipBundle:
    """An open_clip model with its own preprocessing and tokenizer."""

    model: Any  # open_clip.CLIP
    preprocess: Any  # torchvision transform for eval
    tokenizer: Any
    model_name: str
    pretrained: str | None
    weights_id: str
    provenance: dict | None = None  # the project's own mark ({"kind": "random", ...}) or None
    precision: str = "fp32"  # open_clip precision the model was created with
    config_id: str = ""  # hash of the open_clip model config (architecture)
    # adapters merged into the weights (CLIP-LoRA), by kind and content hash; ``weights_id`` stays the
    # base weights' (adapters are checked against it), the feature identity names both
    weight_adapters: tuple[str, ...] = ()

    def feature_identity(self) -> dict:
        """Everything about the model that changes its image features (goes into feature-cache keys)."""
        return {
            "model": self.model_name,
            "weights": "+".join((self.weights_id, *self.weight_adapters)),
            "model_config": self.config_id,
            "precision": self.precision,
            "preprocess": repr(self.preprocess),
        }

    @property
    def embed_dim(self) -> int:
        return (
            int(self.model.text_projection.shape[1])
            if hasattr(self.model, "text_projection")
            else int(self.model.visual.output_dim)
        )


def register_user_model_config(model_name: str, model_config: str | Path) -> None:
    """Register a user's open_clip model-config JSON (a custom architecture) under ``model_name``.

    open_clip names a config by its file name, so the file must be ``<model_name>.json``.
    """
    path = Path(model_config)
    if not path.is_file():
        raise ValueError(f"model config {str(path)!r} does not exist; fix --model.model_config")
    if path.suffix != ".json" or path.stem != model_name:
        raise ValueError(
            f"model config {str(path)!r} defines architecture {path.stem!r} (open_clip names a config by its "
            f"file name) but model_name is {model_name!r}; set --model.model_name {path.stem}"
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"model config {str(path)!r} is not valid JSON ({err}); fix --model.model_config"
        ) from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(
            f"model config {str(path)!r} lacks {missing} (an open_clip model config has embed_dim, vision_cfg, "
            "text_cfg); fix --model.model_config"
        )
    open_clip.add_model_config(path)


def _tag_key(tag: str) -> str:
    return tag.lower().replace("-", "_")  # open_clip compares tags this way


def check_pretrained_tag(model_name: str, tag: str) -> None:
    """Refuse an open_clip ``pretrained`` tag the architecture does not have (open_clip raises a
    RuntimeError after logging the known tags on another line)."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return  # their weights come with the model name
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if _tag_key(tag) not in {_tag_key(t) for t in tags}:
        known = f"its tags: {', '.join(tags)}" if tags else "it has no pretrained tags"
        raise ValueError(
            f"unknown pretrained tag {tag!r} for CLIP model {model_name!r} ({known}); set --model.pretrained to "
            "one of them or to a checkpoint file"
        )


def checkpoint_problem(path: str, model_name: str, err: Exception) -> str:
    """One line on why open_clip could not load the checkpoint file ``path`` into ``model_name``."""
    text = str(err).strip().splitlines()[0].rstrip(":") if str(err).strip() else ""
    # open_clip asserts on resized position embeddings; torch's load_state_dict lists mismatches
    if isinstance(err, AssertionError) or "state_dict" in text or "size mismatch" in text:
        return (
            f"CLIP checkpoint {path!r} does not fit architecture {model_name!r} ({type(err).__name__}: {text}); set "
            "--model.model_name to the architecture it was trained as"
        )
    # safetensors says what is wrong in its header; torch.load's unpickler errors say nothing useful
    safetensors = type(err).__name__ == "SafetensorError"
    detail = f"SafetensorError: {text}" if safetensors else "not a safetensors or PyTorch checkpoint"
    return (
        f"CLIP checkpoint {path!r} cannot be read ({detail}): it is truncated or not a weights file; set "
        "--model.pretrained to an open_clip checkpoint or tag"
    )


def load_clip(
    model_name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    model_config: str | None = None,
) -> ClipBundle:
    """Create an open_clip model, its eval transform and tokenizer.

    Args:
        model_name: an open_clip architecture (``ViT-L-14``), a project config (``cascadevlm-tiny-vit``),
            ``local-dir:<dir>`` or ``hf-hub:<org/repo>`` (config and weights from there).
        pretrained: an open_clip tag (``openai``, ``laion2b_s32b_b82k``), a local checkpoint path, or None.
        device: where to put the model.
        precision: open_clip precision (fp32, fp16, bf16, amp, amp_bf16, pure_fp16, pure_bf16).
        model_config: path of an open_clip model-config JSON named ``<model_name>.json``: a custom
            architecture, registered before the model is created.
    """
    register_model_configs()
    if precision not in PRECISIONS:
        raise ValueError(
            f"unknown CLIP precision {precision!r}; use one of {', '.join(PRECISIONS)} (--model.precision)"
        )
    if model_config:
        register_user_model_config(model_name, model_config)
    known = open_clip.list_models()
    if model_name not in known and not model_name.startswith(("hf-hub:", "local-dir:")):
        close = [m for m in known if model_name.lower().replace("/", "-") in m.lower()][:10]
        hint = f" Similar: {close}." if close else ""
        raise ValueError(
            f"unknown CLIP model {model_name!r}: not an open_clip architecture (a custom one needs "
            f"--model.model_config <{model_name}.json>).{hint}"
        )
    if model_name.startswith("local-dir:") and not Path(model_name.removeprefix("local-dir:")).is_dir():
        raise FileNotFoundError(
            f"CLIP model directory {model_name.removeprefix('local-dir:')!r} does not exist"
        )
    if pretrained and _looks_like_path(pretrained) and not os.path.isfile(pretrained):
        raise FileNotFoundError(
            f"CLIP checkpoint {pretrained!r} does not exist; set pretrained (--model.pretrained) to a checkpoint "
            "file or an open_clip tag"
        )
    is_file = bool(pretrained) and os.path.isfile(pretrained)
    if pretrained and not is_file:
        check_pretrained_tag(model_name, pretrained)
    weights_dir = model_name.removeprefix("local-dir:") if model_name.startswith("local-dir:") else None
    check_manifest(weights_dir or (pretrained if is_file else None), "--model.pretrained")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained or None, device=device, precision=precision
        )
    except Exception as err:  # a file open_clip cannot read or that is another architecture's
        if not is_file:
            raise
        raise ValueError(checkpoint_problem(pretrained, model_name, err)) from err
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipBundle(
        model,
        preprocess,
        tokenizer,
        model_name,
        pretrained,
        weights_id(pretrained, model_name),
        provenance=read_provenance(weights_dir or pretrained),
        precision=precision,
        config_id=config_id(model_name),
    )
