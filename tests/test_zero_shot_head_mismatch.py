"""A cached zero-shot head that is not the one asked for (cascadevlm/clip/zero_shot.py, issue 27): a file at
the key's path made from other key parts (copied, hand-placed, a hash collision) is recomputed and replaced,
with one warning line naming the parts that differ."""

import json

import pytest
import torch
from safetensors.torch import save_file

from cascadevlm.clip.zero_shot import HEAD_DIR, HeadCache, head_key_parts, zero_shot_head

NAMES = [f"species {i}" for i in range(40)]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}."]


def _plant(path, other: dict | None, rows: int, dim: int) -> None:
    """A head file at ``path`` whose metadata says it was made from ``other`` (None: no key parts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {} if other is None else {"key_parts": json.dumps(other, sort_keys=True)}
    save_file({"head": torch.ones(rows, dim)}, str(path), metadata=meta)


PLANTED = {
    "templates": (lambda p: {**p, "templates": ["a sketch of the {}.", p["templates"][1]]},
                  ["templates (2 stored, 2 asked; at 0: 'a sketch of the {}.' where 'a photo of a {}.' was asked)"]),
    "class_names": (lambda p: {**p, "class_names": [*p["class_names"][:7], "Parus major", *p["class_names"][8:]]},
                    ["class_names (40 stored, 40 asked; at 7: 'Parus major' where 'species 7' was asked)"]),
    "fewer class names": (lambda p: {**p, "class_names": p["class_names"][:39]},
                          ["class_names (39 stored, 40 asked; at 39: one list ends)"]),
    "model and weights": (lambda p: {**p, "model": "ViT-L-14", "weights": "sha256:0123"},
                          ["model ('ViT-L-14' stored, 'cascadevlm-tiny-vit' asked)", "weights ('sha256:0123' stored"]),
    "precision": (lambda p: {**p, "precision": "bf16"}, ["precision ('bf16' stored, 'fp32' asked)"]),
    "no key parts": (None, ["no key parts (not a head this project wrote)"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def fresh(tiny_clip_bundle):
    return zero_shot_head(tiny_clip_bundle, NAMES, TEMPLATES, None)


@pytest.mark.parametrize("case", list(PLANTED))
def test_a_planted_head_with_other_key_parts_is_named_in_one_line_and_recomputed(
    tiny_clip_bundle, fresh, tmp_path, caplog, case
):
    b = tiny_clip_bundle
    parts = head_key_parts(b, NAMES, TEMPLATES)
    change, expected = PLANTED[case]
    path = HeadCache(tmp_path / HEAD_DIR).path(parts)
    _plant(path, None if change is None else change(parts), len(NAMES), b.embed_dim)
    with caplog.at_level("WARNING", logger="cascadevlm"):
        head = zero_shot_head(b, NAMES, TEMPLATES, tmp_path)
    assert torch.equal(head, fresh)  # recomputed, never the planted ones
    (line,) = [r.getMessage() for r in caplog.records if "zero-shot head cache" in r.getMessage()]
    assert "\n" not in line and str(path) in line and line.endswith("recomputing it")
    for words in expected:
        assert words in line
    others = {"templates", "class_names", "model", "weights", "precision"} - {
        w.split(" ")[0] for w in expected
    }
    assert not any(f"{k} (" in line for k in others)  # only the parts that differ are named
    assert torch.equal(HeadCache(tmp_path / HEAD_DIR).load(parts), fresh)  # the file is this head now
