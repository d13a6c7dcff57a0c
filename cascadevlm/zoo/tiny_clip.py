"""A tiny open_clip model of a real architecture, random weights, saved as a user's checkpoint would be."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from cascadevlm.clip.model import register_model_configs
from cascadevlm.provenance import METADATA_KEY, read_provenance, write_provenance
from cascadevlm.records import atomic_path

TINY_CLIP = "cascadevlm-tiny-vit"


def tiny_clip_provenance(model_name: str, seed: int) -> dict:
    """The mark written into the project's random-weight CLIP checkpoints (see :mod:`cascadevlm.provenance`)."""
    return {
        "kind": "random",
        "description": f"{model_name} with seeded random weights (seed {seed}), built by cascadevlm.zoo.tiny_clip",
        "model_name": model_name,
        "seed": seed,
    }


def build_tiny_clip(out_dir: str | Path, model_name: str = TINY_CLIP, seed: int = 0) -> Path:
    """Build ``model_name`` with seeded random weights, write ``<out_dir>/<model_name>-seed<seed>.safetensors``.

    The logit scale is set to 100, CLIP's trained value, so probabilities have a realistic spread of
    entropies. Loading goes through ``load_clip(model_name, pretrained=<path>)``, the user's route.
    The file is reused when it already exists (same name, same seed, same weights). Its safetensors
    metadata carries the provenance mark ``{"kind": "random", ...}``; a file written before marks
    existed gets the mark added.
    """
    register_model_configs()
    path = Path(out_dir) / f"{model_name}-seed{seed}.safetensors"
    if path.exists():
        if read_provenance(path) is None:
            write_provenance(path, tiny_clip_provenance(model_name, seed))
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    # atomic, from a file of this builder's own: concurrent builders (DDP ranks, test workers) never read
    # half a file nor rename away each other's (one shared "<name>.tmp" made the second one's rename fail)
    mark = {METADATA_KEY: json.dumps(tiny_clip_provenance(model_name, seed))}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=mark)
    return path


TINY_CUSTOM_TEXT_CLIP = "cascadevlm-tiny-customtext"


def build_tiny_custom_text_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny open_clip ``CustomTextCLIP`` (SigLIP-like text tower: ``model.text`` a bidirectional
    ``TextTransformer`` pooling the last token, linear projection with bias, a logit bias), seeded random
    weights, written as :func:`build_tiny_clip` writes the classic one."""
    return build_tiny_clip(out_dir, model_name=TINY_CUSTOM_TEXT_CLIP, seed=seed)


if __name__ == "__main__":
    import sys

    print(build_tiny_clip(sys.argv[1] if len(sys.argv) > 1 else "artifacts/tiny"))
