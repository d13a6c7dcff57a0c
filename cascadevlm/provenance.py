"""Provenance marks on model weights the project writes itself (random test models, trained demos).

A mark is a small JSON object, at least ``{"kind": "random" | "trained-demo", "description": str}``.
It lives where the weights live, so it travels with them:

- a safetensors checkpoint file (open_clip): the metadata key ``cascadevlm_provenance`` (a JSON string);
- a model directory (Hugging Face ``save_pretrained``, open_clip ``local-dir:``): the file
  ``<dir>/cascadevlm_provenance.json``.

Weights without a mark (every real checkpoint) have no provenance: :func:`read_provenance` gives None.
Nothing is ever guessed from a name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

METADATA_KEY = "cascadevlm_provenance"
DIR_FILE = "cascadevlm_provenance.json"
KINDS = ("random", "trained-demo")


def _check(info: dict) -> dict:
    if not isinstance(info, dict):
        raise ValueError(f"provenance must be a dict, got {type(info).__name__}")
    if info.get("kind") not in KINDS:
        raise ValueError(f"provenance kind must be one of {KINDS}, got {info.get('kind')!r}")
    if not isinstance(info.get("description"), str):
        raise ValueError("provenance needs a 'description' string")
    return dict(info)


def write_provenance(path: str | Path, info: dict) -> Path:
    """Mark the weights at ``path`` (a safetensors file or a model directory) with ``info``.

    For a file the tensors are rewritten with the mark added to their metadata (other metadata kept),
    atomically; for a directory ``cascadevlm_provenance.json`` is written. Returns where the mark is.
    """
    info = _check(info)
    path = Path(path)
    if path.is_dir():
        target = path / DIR_FILE
        tmp = target.with_name(f"{DIR_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(target)
        return target
    if not path.is_file():
        raise FileNotFoundError(f"cannot mark {str(path)!r}: no such file or directory")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"provenance marks go into .safetensors files or model directories, not {str(path)!r}"
        )
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    tensors = load_file(str(path))
    meta[METADATA_KEY] = json.dumps(info)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_provenance(path: str | Path | None) -> dict | None:
    """The mark on the weights at ``path`` (file or directory), or None when unmarked or not local."""
    if not path:
        return None
    path = Path(str(path).removeprefix("local-dir:")).expanduser()
    if path.is_dir():
        target = path / DIR_FILE
        if not target.is_file():
            return None
        try:
            return _check(json.loads(target.read_text()))
        except (ValueError, json.JSONDecodeError):
            return None
    if path.is_file() and path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get(METADATA_KEY)
            return _check(json.loads(raw)) if raw else None
        except Exception:  # not a safetensors file or a malformed mark: no provenance
            return None
    return None
