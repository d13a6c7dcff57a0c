"""The files a run leaves behind: records table, metrics.json, summary.md, sweep.csv, plots, TensorBoard."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from cascadevlm.records import PredictionRecord, atomic_write_text, write_records
from cascadevlm.report.formats import csv_text, display_number, markdown_table


def run_name(*parts: object) -> str:
    """A directory name from run parameters, e.g. ``fashion_mnist_ViT-L-14_openai_test_k0``."""
    clean = [re.sub(r"[^A-Za-z0-9.+_-]+", "-", str(p)).strip("-") for p in parts if p not in (None, "")]
    return "_".join(c for c in clean if c)


def short_weights(pretrained: str | None) -> str:
    """A tag stays as it is; a checkpoint path becomes its file stem."""
    if not pretrained:
        return "random"
    return Path(pretrained).stem if ("/" in pretrained or "." in pretrained) else pretrained


# Method keys of metrics.json as the headline table names them.
METHOD_NAMES = {
    "clip": "CLIP",
    "clip_zero_shot": "CLIP zero-shot",
    "cascade": "cascade",
    "lvlm_all": "LVLM on all",
}
# Parameters that mean something only when an LVLM answers.
LVLM_PARAMS = ("tau", "gate", "lvlm_on", "topk", "incontext_shots", "gate_score", "candidates", "alpha",
               "fusion", "fusion_weight", "lvlm_on_val", "lvlm_calls_val", "lvlm_calls",
               "lvlm_calls_this_attempt", "lvlm_api_errors")  # fmt: skip


def shown_params(params: dict) -> dict:
    """The parameters that apply to this run, for a person (``metrics.json`` keeps every one): no unset
    ones (``adapter None``), no LVLM options without an LVLM, ``alpha`` only with conformal candidates,
    ``fusion_weight`` only with a fusion, k-shot ``shots``/``seed`` only when something used them."""
    p = {k: v for k, v in params.items() if v is not None}
    drop = set()
    if p.get("lvlm") is None:
        drop.update(LVLM_PARAMS)
    if p.get("candidates", "topk") == "topk":
        drop.add("alpha")
    if p.get("fusion", "none") == "none":
        drop.add("fusion_weight")
    if not p.get("lvlm_on_val"):
        drop.update(("lvlm_on_val", "lvlm_calls_val"))
    if p.get("lvlm_calls_this_attempt") == p.get("lvlm_calls"):  # not resumed: the same number twice
        drop.add("lvlm_calls_this_attempt")
    if not p.get("selection_on_eval"):  # said only when tau was chosen on the evaluated images
        drop.add("selection_on_eval")
    if not p.get("adapter") and not p.get("incontext_shots"):
        drop.update(("shots", "seed"))
    return {k: v for k, v in p.items() if k not in drop}


def _pct(v: float, digits: int = 2) -> str:
    return f"{100 * v:.{digits}f}%" if math.isfinite(v) else str(v)


def headline_rows(methods: dict) -> list[tuple[str, str, str]]:
    """(method, top-1 acc, sent to LVLM) for each method of ``metrics.json``; the cascade with its tau."""
    rows = []
    for key, m in methods.items():
        if m is None:
            continue
        name = METHOD_NAMES.get(key, key)
        if "tau" in m:
            name += f" (tau {display_number(m['tau'])})"
        rows.append((name, _pct(m["acc1"]), _pct(m.get("deferral", 0.0), 1)))
    return rows


def _deferred_rows(deferred: dict) -> list[tuple[str, str]]:
    """The deferred-images table: how many of how many first, then what was measured on them."""
    rows = []
    if "deferred" in deferred:
        count = f"{deferred['deferred']} of {deferred.get('images', '?')}"
        if "deferral" in deferred:
            count += f" ({_pct(deferred['deferral'], 1)})"
        rows.append(("deferred images", count))
    shown = {k: v for k, v in deferred.items() if k not in ("images", "deferred", "deferral")}
    rows += [(k, display_number(v)) for k, v in shown.items() if v != {}]  # no fallbacks: no row
    return rows


def summary_markdown(
    title: str, payload: dict, notes: list[str], sweep_rows: list[dict] | None = None
) -> str:
    """The run's report for a person: the headline table first (CLIP / cascade with % sent / LVLM on
    all), the notes, then the details: metrics, deferred images, a sweep excerpt, the parameters."""
    lines = [f"# {title}", ""]
    if payload.get("methods"):
        lines += markdown_table(
            ["method", "top-1 acc", "sent to LVLM"], headline_rows(payload["methods"]), "lrr"
        )
        lines.append("")
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    lines += markdown_table(
        ["metric", "value"], [(k, display_number(v)) for k, v in payload["metrics"].items()]
    )
    if payload.get("deferred"):
        lines += ["", *markdown_table(["on deferred images", "value"], _deferred_rows(payload["deferred"]))]
    if sweep_rows:
        step = max(1, len(sweep_rows) // 10)
        shown = sweep_rows[::step] + ([sweep_rows[-1]] if (len(sweep_rows) - 1) % step else [])
        rows = [(display_number(r["tau"]), _pct(r["deferral"], 1), _pct(r["acc1"])) for r in shown]
        lines += ["", *markdown_table(["tau", "sent to LVLM", "top-1 acc"], rows, "rrr")]
        lines += [
            "",
            "Full sweep: `sweep.csv`; plots: `plots/`; TensorBoard: `tensorboard --logdir <run dir>/tensorboard`.",
        ]
    lines += cost_lines(payload)
    params = [(k, display_number(v)) for k, v in shown_params(payload["params"]).items()]
    lines += ["", *markdown_table(["parameter", "value"], params)]
    return "\n".join(lines) + "\n"


def _cost(v) -> str:
    """A cost for a person: 'unknown' stays so (never 0), numbers with 4 significant digits."""
    if v is None:
        return "-"
    return v if isinstance(v, str) else f"{v:.4g}"


def cost_lines(payload: dict) -> list[str]:
    """The stages table (calls at the run's thresholds, images asked, mean cost per call) and the
    cascade's mean cost per image; with several LVLM stages, every combination's accuracy and cost."""
    cost = payload.get("cost")
    if not cost:
        return []
    rows = [
        (str(st["stage"]), st["name"], str(st["calls"]), str(st["asked"]), _cost(st.get("seconds_per_call")),
         _cost(st.get("usd_per_call")))
        for st in cost["stages"]
    ]  # fmt: skip
    per = cost["per_image"]
    lines = [
        "",
        *markdown_table(
            ["stage", "name", "calls", "asked", "seconds per call", "usd per call"], rows, "rlrrrr"
        ),
    ]
    lines += [
        "",
        f"Cost per image (the stages each image reached): {_cost(per.get('seconds'))} seconds, "
        f"{_cost(per.get('usd'))} usd; per 1000 images: {_cost(cost.get('per_1000_images'))} {cost['unit']}. "
        "Per (image, stage): `stages.parquet`.",
    ]
    combos = payload.get("combinations")
    if combos:
        crow = [
            (key, _pct(c["acc1"]), " / ".join(str(n) for n in c["calls"]),
             _cost(c["cost_per_image"].get("seconds")), _cost(c["cost_per_image"].get("usd")))
            for key, c in combos.items()
        ]  # fmt: skip
        head = ["combination", "top-1 acc", "calls per stage", "seconds per image", "usd per image"]
        lines += ["", *markdown_table(head, crow, "lrrrr"), "", "Pareto front and figure: `pareto/`."]
    return lines


def closing_block(run_dir: str | Path, files: Sequence[str], numbers: Sequence[tuple[str, str]]) -> str:
    """The last lines of an entry point, alike for ``evaluate.py`` and ``train.py fit``: where the run
    was written, what is in it, and the headline numbers (label, value)."""
    rows = [("run", f"{run_dir}/"), ("wrote", ", ".join(files)), *numbers]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def evaluate_closing_block(run_dir: str | Path, files: Sequence[str], methods: dict) -> str:
    """:func:`closing_block` of ``evaluate.py``: each method's top-1 accuracy, the cascade's % sent."""
    numbers = []
    for key, m in methods.items():
        if m is not None:
            sent = f" ({_pct(m.get('deferral', 0.0), 1)} sent to the LVLM)" if key == "cascade" else ""
            numbers.append((METHOD_NAMES.get(key, key), _pct(m["acc1"]) + sent))
    return closing_block(run_dir, files, numbers)


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
        atomic_write_text(paths["sweep"], csv_text(sweep_rows))
    # metrics.json last: its presence means the run finished (the settings sweep skips such runs)
    atomic_write_text(paths["metrics"], json.dumps({**payload, "notes": notes}, indent=2, default=str))
    return paths
