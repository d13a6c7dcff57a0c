"""Backends from YAML: ``{class_path: ..., init_args: {...}}`` (jsonargparse, as LightningCLI reads them)."""

from __future__ import annotations

from pathlib import Path

import yaml

from cascadevlm.lvlm.base import LVLMBackend


def backend_parser():
    """A jsonargparse parser with one ``backend`` argument: any :class:`LVLMBackend` subclass."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LVLMBackend, "backend", required=True)
    return parser


def load_backend(config: str | Path | dict, **init_args) -> LVLMBackend:
    """Build a backend from a YAML file or dict with ``class_path`` and ``init_args``.

    Keyword arguments override ``init_args`` (e.g. ``load_backend(path, device="cpu")``).
    """
    if isinstance(config, (str, Path)):
        data = yaml.safe_load(Path(config).read_text())
        if not isinstance(data, dict) or "class_path" not in data:
            raise ValueError(f"backend config {str(config)!r} needs a top-level class_path and init_args")
    else:
        data = dict(config)
    data = {"class_path": data["class_path"], "init_args": {**(data.get("init_args") or {}), **init_args}}
    parser = backend_parser()
    cfg = parser.parse_object({"backend": data})
    return parser.instantiate_classes(cfg).backend
