"""Accuracy against cost for every combination of a run's stages and thresholds, from its records alone.

Writes ``pareto.csv`` (every combination's best points, the front marked, each single model), ``pareto.md``
and ``pareto.png`` (with a PDF and the data drawn beside it). No model runs: the points come from
``stages.parquet`` and ``records.parquet`` (``val_stages.parquet`` / ``val_records.parquet`` with
``--split val``)::

    python -m cascadevlm.report.pareto RUN_DIR [--unit seconds|usd] [--split test|val] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cascadevlm.errors import one_line_errors
from cascadevlm.flags import one_flag_style
from cascadevlm.gating.cost import (
    UNITS,
    CostTable,
    ParetoPoint,
    combinations,
    pareto_front,
    pareto_points,
    read_cost_table,
    single_model_points,
)
from cascadevlm.records import atomic_write_text
from cascadevlm.report.formats import csv_text, display_number, markdown_table
from cascadevlm.report.plots import in_paper_style, plt, save_figure, wrap_title

SPLIT_FILES = {
    "test": ("stages.parquet", "records.parquet"),
    "val": ("val_stages.parquet", "val_records.parquet"),
}
CSV_FIELDS = [
    "kind",
    "combination",
    "stage_ids",
    "thresholds",
    "acc",
    "cost_per_1000",
    "cost_per_image",
    "calls",
    "on_front",
    "exact",
]
MD_POINTS_PER_COMBINATION = 12  # pareto.md lists at most this many of a combination's best points
MD_FRONT_ROWS = 40  # and at most this many points of the front


def combination_name(stages: tuple[str, ...]) -> str:
    return " -> ".join(stages)


def single_name(point: ParetoPoint) -> str:
    return f"{point.stages[0]} only" if len(point.stages) == 1 else f"{point.stages[-1]} on every image"


def _row(kind: str, p: ParetoPoint) -> dict:
    return {
        "kind": kind,
        "combination": single_name(p) if kind == "single" else combination_name(p.stages),
        "stage_ids": " ".join(map(str, p.stage_ids)),
        "thresholds": " ".join(repr(float(t)) for t in p.thresholds),
        "acc": p.acc,
        "cost_per_1000": p.cost_per_1000,
        "cost_per_image": p.cost_per_1000 / 1000,
        "calls": " ".join(map(str, p.calls)),
        "on_front": p.on_front,
        "exact": p.exact,
    }


def _md_rows(points: list[ParetoPoint], name) -> list[list[str]]:
    return [
        [
            name(p),
            ", ".join(display_number(t) for t in p.thresholds) or "-",
            f"{100 * p.acc:.2f}",
            display_number(p.cost_per_1000) if math.isfinite(p.cost_per_1000) else "unknown",
            " / ".join(map(str, p.calls)),
        ]
        for p in points
    ]


def _spread(points: list[ParetoPoint], at_most: int) -> list[ParetoPoint]:
    """At most ``at_most`` of ``points`` (sorted by cost), evenly spaced, first and last included."""
    if len(points) <= at_most:
        return list(points)
    step = (len(points) - 1) / (at_most - 1)
    return [points[round(i * step)] for i in range(at_most)]


def pareto_markdown(
    table: CostTable, points: list[ParetoPoint], singles: list[ParetoPoint], title: str
) -> str:
    unit = table.unit
    head = ["stages", "thresholds", "accuracy %", f"{unit} per 1000 images", "calls per stage"]
    front = pareto_front(points)
    labelled = int((table.labels >= 0).sum())
    lines = [
        f"# Accuracy against cost: {title}",
        "",
        f"{table.n} images ({labelled} labelled), {len(table.stages)} stages "
        f"({', '.join(s.name for s in table.stages)}); cost in {unit} per 1000 images; "
        "an image goes on when the stage's uncertainty is above its threshold.",
    ]
    if not all(p.exact for p in points):
        lines += [
            "",
            "Some combinations were searched on quantile grids (docs/cost.md): column `exact` in pareto.csv.",
        ]
    shown = _spread(front, MD_FRONT_ROWS)
    lines += ["", "## Pareto front (every combination)", ""]
    if len(shown) < len(front):
        lines += [f"{len(shown)} of its {len(front)} points, evenly spread (all in pareto.csv: on_front)", ""]
    lines += markdown_table(head, _md_rows(shown, lambda p: combination_name(p.stages)), "llrrl")
    lines += ["", "## Single models", "", *markdown_table(head, _md_rows(singles, single_name), "llrrl")]
    lines += ["", "## Each combination's best points", ""]
    for combo in combinations(table):
        names = tuple(table.stages[s].name for s in combo)
        own = sorted((p for p in points if p.stage_ids == combo), key=lambda p: p.cost_per_1000)
        shown = _spread(own, MD_POINTS_PER_COMBINATION)
        more = f", {len(shown)} shown (all in pareto.csv)" if len(shown) < len(own) else ""
        lines += [f"### {combination_name(names)}: {len(own)} point(s){more}", ""]
        if own:
            lines += markdown_table(head, _md_rows(shown, lambda p: combination_name(p.stages)), "llrrl")
        else:
            lines += ["no setting without missing answers or unknown costs"]
        lines += [""]
    return "\n".join(lines)


@in_paper_style
def pareto_figure(table: CostTable, points: list[ParetoPoint], singles: list[ParetoPoint], title: str):
    """Accuracy against cost per 1000 images: each combination's best points, the front as a step line,
    single models as labelled markers."""
    fig, ax = plt.subplots()
    for combo in combinations(table):
        own = [p for p in points if p.stage_ids == combo]
        if own:
            ax.scatter(
                [p.cost_per_1000 for p in own],
                [100 * p.acc for p in own],
                s=6,
                alpha=0.6,
                label=combination_name(own[0].stages),
            )
    front = pareto_front(points)
    if front:
        ax.step(
            [p.cost_per_1000 for p in front],
            [100 * p.acc for p in front],
            where="post",
            color="black",
            lw=1.2,
            label="Pareto front",
        )
    for p in singles:
        if math.isfinite(p.cost_per_1000) and math.isfinite(p.acc):
            ax.scatter([p.cost_per_1000], [100 * p.acc], marker="*", s=90, color="tab:red", zorder=5)
            ax.annotate(
                single_name(p),
                (p.cost_per_1000, 100 * p.acc),
                fontsize=7,
                xytext=(4, -9),
                textcoords="offset points",
            )
    ax.margins(x=0.12)  # room for the labels of the rightmost markers
    ax.set_xlabel(f"cost ({table.unit} per 1000 images)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(wrap_title(title), fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def write_pareto_report(table: CostTable, out_dir: str | Path, title: str) -> dict[str, Path]:
    """``pareto.csv``, ``pareto.md`` and ``pareto.png`` (plus its PDF and data) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = pareto_points(table)
    singles = single_model_points(table)
    rows = [_row("point", p) for p in points] + [_row("single", p) for p in singles]
    paths = {
        "csv": atomic_write_text(out / "pareto.csv", csv_text(rows, CSV_FIELDS)),
        "md": atomic_write_text(out / "pareto.md", pareto_markdown(table, points, singles, title)),
    }
    data = {"unit": table.unit, "points": rows}
    paths["png"] = save_figure(pareto_figure(table, points, singles, title), out / "pareto.png", data)["png"]
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cascadevlm.report.pareto", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("run_dir", help="run directory with stages.parquet and records.parquet")
    p.add_argument("--unit", choices=UNITS, default="seconds", help="cost unit (default seconds)")
    p.add_argument("--split", choices=list(SPLIT_FILES), default="test", help="records of which split")
    p.add_argument(
        "--out", help="output directory (default RUN_DIR/pareto, RUN_DIR/pareto_val for --split val)"
    )
    return one_flag_style(p)


@one_line_errors
def main(argv: list[str] | None = None) -> dict[str, Path]:
    a = build_parser().parse_args(argv)
    run_dir = Path(a.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    stages_name, records_name = SPLIT_FILES[a.split]
    table = read_cost_table(run_dir / stages_name, run_dir / records_name, unit=a.unit)
    out = Path(a.out) if a.out else run_dir / ("pareto" if a.split == "test" else "pareto_val")
    paths = write_pareto_report(table, out, f"{run_dir.name} ({a.split}, {a.unit})")
    print(paths["md"].read_text())
    return paths


__all__ = ["main", "pareto_figure", "pareto_markdown", "write_pareto_report"]

if __name__ == "__main__":
    main()
