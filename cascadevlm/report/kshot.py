"""k x seeds sweeps of few-shot adapters: per-run ``metrics.json`` files -> mean +/- std tables.

Each training run (``train.py fit``) leaves ``<runs>/<dataset>_<method>/k<k>_seed<seed>/metrics.json``.
This module reads them all and aggregates over seeds per (dataset, method, k)::

    python -m cascadevlm.report.kshot --runs runs/train [--out runs/train/kshot.md] [--csv kshot.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from cascadevlm.report.formats import markdown_table as table_lines

METRICS = ("val_acc", "test_acc", "zero_shot_val_acc", "zero_shot_test_acc")


def collect_runs(root: str | Path) -> list[dict]:
    """Every run's metrics under ``root`` (any depth), with the path it came from."""
    rows = []
    for path in sorted(Path(root).rglob("metrics.json")):
        try:
            row = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from err
        if not isinstance(row, dict) or not {"dataset", "method", "shots", "seed"} <= set(row):
            continue  # another kind of run (e.g. an evaluation) writes metrics.json too
        if row.get("selection") not in (None, "val_split"):  # the k-shot protocol, when not the default
            row["method"] = f"{row['method']} (selection {row['selection']})"
        rows.append({**row, "path": str(path)})
    if len({(r.get("model_name"), r.get("weights_id")) for r in rows}) > 1:
        for r in rows:  # runs of several CLIP models or weights under one root: never one cell
            r["method"] = f"{r['method']} ({clip_label(r)})"
    return rows


def clip_label(row: dict) -> str:
    """The CLIP a run adapted, as run names show it: model and weights (tag or file stem)."""
    from cascadevlm.report.summary import short_weights

    weights = short_weights(row["pretrained"]) if row.get("pretrained") else str(row.get("weights_id"))[:20]
    return f"{row.get('model_name')} {weights}"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (dataset, method, k): seeds, and mean/std of each metric over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["method"], int(r["shots"]))].append(r)
    out = []
    for (dataset, method, k), runs in sorted(groups.items()):
        seeds = sorted(int(r["seed"]) for r in runs)
        if len(seeds) != len(set(seeds)):
            dup = sorted({s for s in seeds if seeds.count(s) > 1})
            where = sorted({str(Path(r["path"]).parent) for r in runs if int(r["seed"]) in dup})
            raise ValueError(f"{dataset} {method} k={k}: seed(s) {dup} appear in more than one run: {where}")
        row = {"dataset": dataset, "method": method, "k": k, "n_seeds": len(seeds), "seeds": seeds}
        for m in METRICS:
            vals = [float(r[m]) for r in runs if r.get(m) is not None]
            if vals:
                row[f"{m}_mean"], row[f"{m}_std"] = mean_std(vals)
        out.append(row)
    return out


def pick_metric(table: list[dict]) -> str:
    """Test accuracy when every run has one, else validation accuracy."""
    return "test_acc" if table and all("test_acc_mean" in r for r in table) else "val_acc"


def markdown_table(table: list[dict], metric: str | None = None, percent: bool = True) -> str:
    """Rows (dataset, method), columns k, cells ``mean ± std`` of ``metric`` over seeds."""
    metric = metric or pick_metric(table)
    ks = sorted({r["k"] for r in table})
    scale = 100.0 if percent else 1.0
    cells: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    zero_shot: dict[tuple[str, str], str] = {}
    for r in table:
        key = (r["dataset"], r["method"])
        if f"{metric}_mean" in r:
            cells[key][r["k"]] = f"{scale * r[f'{metric}_mean']:.1f} ± {scale * r[f'{metric}_std']:.1f}"
        zs = r.get(f"zero_shot_{metric}_mean")
        if zs is not None:
            zero_shot[key] = f"{scale * zs:.1f}"
    unit = " (%)" if percent else ""
    head = ["dataset", "method", "zero-shot", *[f"k={k}" for k in ks]]
    rows = [
        [key[0], key[1], zero_shot.get(key, "")] + [cells[key].get(k, "") for k in ks]
        for key in sorted(cells)
    ]
    lines = [f"{metric}{unit}, mean ± std over seeds", "", *table_lines(head, rows)]
    seeds = sorted({r["n_seeds"] for r in table})
    lines += ["", f"seeds per cell: {', '.join(map(str, seeds))}"]
    return "\n".join(lines) + "\n"


def write_csv(table: list[dict], path: str | Path) -> Path:
    cols = ["dataset", "method", "k", "n_seeds", "seeds"] + [
        f"{m}_{s}" for m in METRICS for s in ("mean", "std")
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in table:
            w.writerow({c: (" ".join(map(str, r[c])) if c == "seeds" else r.get(c, "")) for c in cols})
    return path


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/train", help="directory holding the training runs")
    p.add_argument(
        "--metric", choices=["val_acc", "test_acc"], help="default: test_acc when every run has it"
    )
    p.add_argument("--out", help="write the Markdown table here (default: <runs>/kshot.md)")
    p.add_argument("--csv", help="write the long-format table here (default: <runs>/kshot.csv)")
    args = p.parse_args(argv)
    rows = collect_runs(args.runs)
    if not rows:
        raise SystemExit(
            f"no training runs (metrics.json with dataset/method/shots/seed) under {args.runs!r}"
        )
    table = aggregate(rows)
    md = markdown_table(table, args.metric)
    out = Path(args.out or Path(args.runs) / "kshot.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    write_csv(table, args.csv or Path(args.runs) / "kshot.csv")
    print(md, end="")
    return md


if __name__ == "__main__":
    main()
