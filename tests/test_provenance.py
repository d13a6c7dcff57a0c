"""Provenance marks: the project's own random/demo weights say so in their metadata; nothing is guessed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cascadevlm.clip.model import load_clip
from cascadevlm.provenance import DIR_FILE, METADATA_KEY, read_provenance, write_provenance
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
