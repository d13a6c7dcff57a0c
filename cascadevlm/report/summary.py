"""The files a run leaves behind: records table, metrics.json, summary.md, sweep.csv, plots, TensorBoard."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from cascadevlm.records import PredictionRecord, atomic_path, atomic_write_text, write_records


def run_name(*parts: object) -> str:
    """A directory name from run parameters, e.g. ``fashion_mnist_ViT-L-14_openai_test_k0``."""
    clean = [re.sub(r"[^A-Za-z0-9.+_-]+", "-", str(p)).strip("-") for p in parts if p not in (None, "")]
    return "_".join(c for c in clean if c)


def short_weights(pretrained: str | None) -> str:
    """A tag stays as it is; a checkpoint path becomes its file stem."""
    if not pretrained:
        return "random"
    return Path(pretrained).stem if ("/" in pretrained or "." in pretrained) else pretrained


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return str(v)


def summary_markdown(
    title: str, payload: dict, notes: list[str], sweep_rows: list[dict] | None = None
) -> str:
    lines = [f"# {title}", ""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    lines += ["| parameter | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in payload["params"].items()]
    if payload.get("methods"):
        lines += ["", "| method | top-1 acc | sent to LVLM |", "|---|---:|---:|"]
        for name, m in payload["methods"].items():
            if m is not None:
                lines.append(f"| {name} | {100 * m['acc1']:.2f}% | {100 * m.get('deferral', 0.0):.1f}% |")
    lines += ["", "| metric | value |", "|---|---|"] + [
        f"| {k} | {_fmt(v)} |" for k, v in payload["metrics"].items()
    ]
    if payload.get("deferred"):
        lines += ["", "| on deferred images | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in payload["deferred"].items()]
    if sweep_rows:
        step = max(1, len(sweep_rows) // 10)
        shown = sweep_rows[::step] + ([sweep_rows[-1]] if (len(sweep_rows) - 1) % step else [])
        lines += ["", "| tau | sent to LVLM | top-1 acc |", "|---:|---:|---:|"]
        lines += [f"| {r['tau']:.4g} | {100 * r['deferral']:.1f}% | {100 * r['acc1']:.2f}% |" for r in shown]
        lines += [
            "",
            "Full sweep: `sweep.csv`; plots: `plots/`; TensorBoard: `tensorboard --logdir <run dir>/tensorboard`.",
        ]
    return "\n".join(lines) + "\n"


def write_run_outputs(
    run_dir: str | Path,
    records: list[PredictionRecord],
    payload: dict,
    notes: list[str],
    sweep_rows: list[dict] | None = None,
) -> dict[str, Path]:
    """Write ``records.parquet``, ``metrics.json``, ``summary.md`` and ``sweep.csv`` into ``run_dir``,
    each atomically (a crash leaves the previous file or none, never half a file)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"records": write_records(run_dir / "records.parquet", records)}
    paths["metrics"] = run_dir / "metrics.json"
    paths["summary"] = run_dir / "summary.md"
    atomic_write_text(paths["summary"], summary_markdown(run_dir.name, payload, notes, sweep_rows))
    if sweep_rows:
        paths["sweep"] = run_dir / "sweep.csv"
        with atomic_path(paths["sweep"]) as tmp, tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(sweep_rows[0]))
            w.writeheader()
            w.writerows(sweep_rows)
    # metrics.json last: its presence means the run finished (the settings sweep skips such runs)
    atomic_write_text(paths["metrics"], json.dumps({**payload, "notes": notes}, indent=2, default=str))
    return paths
