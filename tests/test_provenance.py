"""Provenance marks: the project's own random/demo weights say so in their metadata; nothing is guessed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cascadevlm.clip.model import load_clip
from cascadevlm.provenance import (
    DIR_FILE,
    METADATA_KEY,
    check_manifest,
    file_sha256,
    read_provenance,
    write_provenance,
)
from cascadevlm.zoo.tiny_clip import TINY_CLIP


def test_mark_round_trips_through_a_safetensors_file_and_keeps_tensors_and_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3)}
    save_file(tensors, str(path), metadata={"other": "kept"})
    assert read_provenance(path) is None
    info = {"kind": "trained-demo", "description": "a demo model", "steps": 3}
    write_provenance(path, info)
    assert read_provenance(path) == info
    assert torch.equal(load_file(str(path))["a"], tensors["a"])
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["other"] == "kept" and json.loads(meta[METADATA_KEY]) == info


def test_mark_round_trips_through_a_model_directory(tmp_path):
    d = tmp_path / "tiny-foo"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert read_provenance(d) is None  # named "tiny", but unmarked: no provenance
    write_provenance(d, {"kind": "random", "description": "x"})
    assert json.loads((d / DIR_FILE).read_text())["kind"] == "random"
    assert read_provenance(d) == {"kind": "random", "description": "x"}
    assert read_provenance(f"local-dir:{d}") == {"kind": "random", "description": "x"}


def test_bad_marks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="provenance kind must be one of"):
        write_provenance(tmp_path, {"kind": "tiny", "description": "x"})
    assert read_provenance(tmp_path / "missing.safetensors") is None
    assert read_provenance(None) is None


def test_tiny_clip_checkpoint_is_marked_random_and_the_bundle_carries_it(tiny_clip_path, tmp_path):
    bundle = load_clip(TINY_CLIP, str(tiny_clip_path))
    assert bundle.provenance["kind"] == "random"
    # The same weights under a name containing "tiny" but without the mark: no provenance.
    plain = tmp_path / "tiny-clip-copy.safetensors"
    save_file(load_file(str(tiny_clip_path)), str(plain))
    assert load_clip(TINY_CLIP, str(plain)).provenance is None


DEMO = Path(__file__).resolve().parents[1] / "cascadevlm" / "zoo" / "checkpoints"


def _altered_demo_copy(tmp_path: Path, rel: str) -> tuple[Path, str, str]:
    """The demo's manifest and the weights of ``rel`` (a file or the LVLM folder) copied to ``tmp_path``,
    one byte of ``rel``'s weights flipped; returns the copy, the changed file's new and listed sha256."""
    copy = tmp_path / "checkpoints"
    copy.mkdir()
    shutil.copy(DEMO / "manifest.json", copy)
    if (DEMO / rel).is_dir():
        shutil.copytree(DEMO / rel, copy / rel)
        changed = f"{rel}/model.safetensors"
    else:
        shutil.copy(DEMO / rel, copy / rel)
        changed = rel
    assert read_provenance(copy / rel)["kind"] == "trained-demo"
    check_manifest(copy / rel, "--flag")  # the copy as committed passes
    data = bytearray((copy / changed).read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor: still a readable checkpoint
    (copy / changed).write_bytes(bytes(data))
    listed = json.loads((DEMO / "manifest.json").read_text())["files"][changed]
    return copy, file_sha256(copy / changed), listed


def _refusal(copy: Path, changed: str, actual: str, listed: str, flag: str) -> str:
    return (
        f"{copy / changed} differs from {copy / 'manifest.json'} (sha256 {actual[:12]}..., the manifest says "
        f"{listed[:12]}...): these are not the project's demo weights; restore them (git checkout -- {copy}) or "
        f"give other weights ({flag})"
    )


def test_demo_clip_whose_bytes_differ_from_the_manifest_is_refused(tmp_path):
    copy, actual, listed = _altered_demo_copy(tmp_path, "clip.safetensors")
    with pytest.raises(ValueError) as err:  # it used to load, with other scores than the demo's
        load_clip("cascadevlm-tiny-vit", str(copy / "clip.safetensors"))
    assert str(err.value) == _refusal(copy, "clip.safetensors", actual, listed, "--model.pretrained")


def test_demo_lvlm_whose_bytes_differ_from_the_manifest_is_refused(tmp_path):
    from cascadevlm.lvlm.transformers_backend import load_model_and_processor

    copy, actual, listed = _altered_demo_copy(tmp_path, "llava")
    with pytest.raises(ValueError) as err:
        load_model_and_processor(str(copy / "llava"), device="cpu")
    expected = _refusal(copy, "llava/model.safetensors", actual, listed, "--lvlm.init_args.model")
    assert str(err.value) == expected
