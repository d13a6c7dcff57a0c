"""The files a run leaves behind: records table, metrics.json and a short Markdown summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cascadevlm.records import PredictionRecord, write_records


def run_name(*parts: object) -> str:
    """A directory name from run parameters, e.g. ``fashion_mnist_ViT-L-14_openai_test_k0``."""
    clean = [re.sub(r"[^A-Za-z0-9.+_-]+", "-", str(p)).strip("-") for p in parts if p not in (None, "")]
    return "_".join(c for c in clean if c)


def short_weights(pretrained: str | None) -> str:
    """A tag stays as it is; a checkpoint path becomes its file stem."""
    if not pretrained:
        return "random"
    return Path(pretrained).stem if ("/" in pretrained or "." in pretrained) else pretrained


def write_run_outputs(
    run_dir: str | Path, records: list[PredictionRecord], metrics: dict, params: dict, notes: list[str]
) -> dict[str, Path]:
    """Write ``records.parquet``, ``metrics.json`` and ``summary.md`` into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"records": write_records(run_dir / "records.parquet", records)}
    payload = {"params": params, "metrics": metrics, "notes": notes}
    paths["metrics"] = run_dir / "metrics.json"
    paths["metrics"].write_text(json.dumps(payload, indent=2, default=str))
    lines = [f"# {run_dir.name}", ""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    lines += ["| parameter | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in params.items()]
    lines += ["", "| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    paths["summary"] = run_dir / "summary.md"
    paths["summary"].write_text("\n".join(lines) + "\n")
    return paths
