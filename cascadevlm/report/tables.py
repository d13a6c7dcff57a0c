"""Results tables across runs (dataset x setting x method), mean +/- std over seeds, Markdown and CSV."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path

from cascadevlm.errors import one_line_errors
from cascadevlm.report.kshot import mean_std  # one mean / sample-std for every seed table


def collect_results(run_dirs: list[str | Path]) -> list[dict]:
    """One row per (run, method) from each run's ``metrics.json`` ``methods`` block."""
    rows = []
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{d} has no metrics.json (the run did not finish): rerun it or leave it out"
            )
        payload = json.loads(path.read_text())
        p = payload["params"]
        # k, seed and the adapter's method come from the adapter file (evaluate.py writes them into
        # params), so a 16-shot CoOp run is never listed under data.shots' default of 0
        shots = int(p.get("shots") or 0)
        adapter_method = p.get("adapter_method")
        if adapter_method and p.get("adapter_selection") not in (None, "val_split"):
            adapter_method += f", selection {p['adapter_selection']}"  # the k-shot protocol, when not the default
        if adapter_method and p.get("adapter_mix") not in (None, 1.0):
            adapter_method += f", mix {p['adapter_mix']:g}"  # WiSE-FT-style mixing with zero-shot
        for method, acc in payload.get("methods", {}).items():
            if acc is None:
                continue
            if adapter_method and method != "clip_zero_shot":
                method = f"{method} ({adapter_method})"  # runs of different adapters never mix
            rows.append(
                {
                    "dataset": p["dataset"],
                    "setting": f"{shots}-shot",
                    "shots": shots,
                    "seed": p.get("seed"),
                    "method": method,
                    "acc1": float(acc["acc1"]),
                    "deferral": float(acc.get("deferral", 0.0)),
                    "run": str(d),
                }
            )
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std (over seeds) of accuracy and deferral per (dataset, setting, method)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["shots"], r["method"])].append(r)
    out = []
    for (dataset, shots, method), rs in sorted(groups.items()):
        acc_mean, acc_std = mean_std([100 * r["acc1"] for r in rs])
        deferral_mean, _ = mean_std([100 * r["deferral"] for r in rs])
        out.append(
            {
                "dataset": dataset,
                "setting": f"{shots}-shot",
                "method": method,
                "seeds": len(rs),
                "acc1_mean": acc_mean,
                "acc1_std": acc_std,
                "deferral_mean": deferral_mean,
            }
        )
    return out


def to_markdown(agg: list[dict]) -> str:
    lines = [
        "| dataset | setting | method | seeds | top-1 acc (%) | sent to LVLM (%) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in agg:
        lines.append(
            f"| {r['dataset']} | {r['setting']} | {r['method']} | {r['seeds']} | "
            f"{r['acc1_mean']:.2f} ± {r['acc1_std']:.2f} | {r['deferral_mean']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def to_csv(agg: list[dict]) -> str:
    buf = io.StringIO()
    if agg:
        w = csv.DictWriter(buf, fieldnames=list(agg[0]))
        w.writeheader()
        w.writerows(agg)
    return buf.getvalue()


def write_results_tables(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Path]:
    agg = aggregate(collect_results(run_dirs))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(to_markdown(agg))
    (out_dir / "results.csv").write_text(to_csv(agg))
    from torch.utils.tensorboard import SummaryWriter

    from cascadevlm.report.tensorboard import fresh_log_dir

    # the same table in TensorBoard's text tab; a rerun replaces it rather than adding a second one
    with SummaryWriter(str(fresh_log_dir(out_dir / "tensorboard"))) as tb:
        tb.add_text("results", to_markdown(agg), 0)
    paths = {
        "markdown": out_dir / "results.md",
        "csv": out_dir / "results.csv",
        "tensorboard": out_dir / "tensorboard",
    }
    if len({r["setting"] for r in agg}) > 1:  # a k-shot sweep: accuracy against k
        from cascadevlm.report.kshot import plot_accuracy_vs_k

        series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
        for r in agg:
            series[r["method"]].append((int(r["setting"].split("-")[0]), r["acc1_mean"], r["acc1_std"]))
        # k = 0 of "clip (linear_probe)" is zero-shot "clip": start each adapter's line there
        for method in [m for m in series if " (" in m]:
            base = method.split(" (")[0]
            series[method] += [p for p in series.get(base, []) if p[0] == 0]
        for base in {m.split(" (")[0] for m in series if " (" in m}:
            if all(p[0] == 0 for p in series.get(base, [])):
                series.pop(base, None)
        title = f"{', '.join(sorted({r['dataset'] for r in agg}))}: accuracy vs k (mean ± std over seeds)"
        paths["plot"] = plot_accuracy_vs_k(series, out_dir / "accuracy_vs_k.png", title)
    return paths


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """``python -m cascadevlm.report.tables RUN_DIR... --out DIR``: aggregate finished runs."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("runs", nargs="+", help="run directories (each with metrics.json), or a parent directory")
    ap.add_argument("--out", default="runs/tables")
    args = ap.parse_args(argv)
    dirs = []
    for r in map(Path, args.runs):
        dirs += [r] if (r / "metrics.json").exists() else sorted(p.parent for p in r.glob("*/metrics.json"))
    if not dirs:
        raise FileNotFoundError(f"no finished run (a directory with metrics.json) in {', '.join(args.runs)}")
    paths = write_results_tables(dirs, args.out)
    print(paths["markdown"].read_text())


if __name__ == "__main__":
    main()
