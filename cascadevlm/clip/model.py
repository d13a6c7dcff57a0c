"""Loading open_clip models by architecture and `pretrained` tag or checkpoint path."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from cascadevlm.provenance import read_provenance

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


def register_model_configs() -> None:
    """Add the project's own model configs (tiny ones for offline tests) to open_clip's registry."""
    known = set(open_clip.list_models())
    if any(p.stem not in known for p in MODEL_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


_HASHES: dict[tuple[str, int, float], str] = {}


def file_sha256(path: str | Path) -> str:
    """Content hash of a file, memoised on (path, size, mtime)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def weights_id(pretrained: str | None) -> str:
    """Identifies the weights for cache keys: the tag, or the checkpoint file's content hash."""
    if not pretrained:
        return "random-init"
    if os.path.isfile(pretrained):
        return "sha256:" + file_sha256(pretrained)
    return pretrained


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

    @property
    def embed_dim(self) -> int:
        return (
            int(self.model.text_projection.shape[1])
            if hasattr(self.model, "text_projection")
            else int(self.model.visual.output_dim)
        )


_TINY_FILE = re.compile(r"^(?P<model>cascadevlm-[\w-]+)-seed(?P<seed>\d+)\.safetensors$")


def ensure_tiny_checkpoint(model_name: str, pretrained: str | None) -> None:
    """Write the seeded tiny checkpoint named by ``pretrained`` if it is missing (offline demo only).

    ``pretrained`` must be a path named ``<model_name>-seed<N>.safetensors`` for one of the project's
    tiny configs (``cascadevlm-*``); anything else is an error, so real weights are never faked.
    """
    path = Path(pretrained or "")
    match = _TINY_FILE.match(path.name)
    if not match or match["model"] != model_name:
        raise ValueError(
            f"build_tiny needs pretrained to be a path named '{model_name}-seed<N>.safetensors' "
            f"for a project tiny model (cascadevlm-*); got model_name={model_name!r}, pretrained={pretrained!r}"
        )
    if not path.exists():
        from cascadevlm.zoo.tiny_clip import build_tiny_clip

        build_tiny_clip(path.parent, model_name=model_name, seed=int(match["seed"]))


def load_clip(
    model_name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    build_tiny: bool = False,
) -> ClipBundle:
    """Create an open_clip model, its eval transform and tokenizer.

    Args:
        model_name: an open_clip architecture (``ViT-L-14``) or a project config (``cascadevlm-tiny-vit``).
        pretrained: an open_clip tag (``openai``, ``laion2b_s32b_b82k``), a local checkpoint path, or None.
        device: where to put the model.
        precision: open_clip precision string (fp32, fp16, bf16, amp).
        build_tiny: first write the project's seeded tiny checkpoint at ``pretrained`` if missing (demo).
    """
    register_model_configs()
    if build_tiny:
        ensure_tiny_checkpoint(model_name, pretrained)
    known = open_clip.list_models()
    if model_name not in known and not model_name.startswith(("hf-hub:", "local-dir:")):
        close = [m for m in known if model_name.lower().replace("/", "-") in m.lower()][:10]
        hint = f" Similar: {close}." if close else ""
        raise ValueError(f"unknown CLIP model {model_name!r}: not an open_clip architecture.{hint}")
    if pretrained and _looks_like_path(pretrained) and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"CLIP checkpoint {pretrained!r} does not exist")
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained or None, device=device, precision=precision
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    weights_dir = model_name.removeprefix("local-dir:") if model_name.startswith("local-dir:") else None
    provenance = read_provenance(weights_dir or pretrained)
    return ClipBundle(
        model, preprocess, tokenizer, model_name, pretrained, weights_id(pretrained), provenance=provenance
    )
