"""Provenance marks on model weights the project writes itself (random test models, trained demos).

A mark is a small JSON object, at least ``{"kind": "random" | "trained-demo", "description": str}``.
It lives where the weights live, so it travels with them:

- a safetensors checkpoint file (open_clip): the metadata key ``cascadevlm_provenance`` (a JSON string);
- a model directory (Hugging Face ``save_pretrained``, open_clip ``local-dir:``): the file
  ``<dir>/cascadevlm_provenance.json``.

Weights without a mark (every real checkpoint) have no provenance: :func:`read_provenance` gives None.
Nothing is ever guessed from a name.

The project's trained demo weights also have a ``manifest.json`` beside them with each file's sha256
(``cascadevlm/zoo/checkpoints``): :func:`check_manifest` refuses weights whose bytes differ from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cascadevlm.records import atomic_path, atomic_write_text

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
        return atomic_write_text(target, json.dumps(info, indent=1))
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
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
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


_HASHES: dict[tuple[str, int, int], str] = {}
MANIFEST = "manifest.json"


def file_sha256(path: str | Path) -> str:
    """Content hash of a file, memoised on (path, size, mtime in ns)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def check_manifest(path: str | Path | None, flag: str) -> None:
    """Refuse the project's own trained weights (a ``trained-demo`` mark) whose files differ from the
    ``manifest.json`` beside them (in the folder of a checkpoint file, the parent of a model directory):
    altered demo weights would move scores and choices while the run still claims the demo's numbers.
    Unmarked weights, and marked ones with no manifest beside them, are not checked. ``flag`` names the
    option that gave the weights, for the message."""
    if not path:
        return
    weights = Path(str(path).removeprefix("local-dir:")).expanduser()
    mark = read_provenance(weights)
    manifest = weights.resolve().parent / MANIFEST
    if mark is None or mark["kind"] != "trained-demo" or not manifest.is_file():
        return
    try:
        listed = json.loads(manifest.read_text()).get("files", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        raise ValueError(f"{manifest} is not a readable manifest; restore it ({flag} {path})") from None
    root, target = manifest.parent, weights.resolve()
    for rel, expected in sorted(listed.items()):
        file = root / rel
        if file != target and target not in file.parents:
            continue  # another model's file
        actual = file_sha256(file) if file.is_file() else None
        if actual != expected:
            found = f"sha256 {actual[:12]}..." if actual else "it is missing"
            raise ValueError(
                f"{file} differs from {manifest} ({found}, the manifest says {expected[:12]}...): these are not "
                f"the project's demo weights; restore them (git checkout -- {root}) or give other weights ({flag})"
            )
