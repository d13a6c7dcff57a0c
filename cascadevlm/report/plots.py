"""Figures (matplotlib, headless, one style): a run's threshold sweep; a study's runs overlaid (accuracy vs
images sent, with seed bands) and accuracy vs k. Each PNG gets a PDF and the JSON of the data it draws
beside it, so a figure can be checked against its table.

Both plots mark the references a reader compares the cascade with, as horizontal lines: CLIP alone,
the LVLM on every image, and chance (1 / classes). Entropy thresholds of a confident CLIP crowd near
zero, so accuracy against tau is drawn on a symmetric-log axis whose linear part ends at the smallest
positive threshold of the sweep: every point of the curve gets its own room.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cascadevlm.records import atomic_path  # noqa: E402

# name -> (matplotlib style) of the reference lines, in legend order
REFERENCE_STYLES = {
    "CLIP only": {"color": "tab:blue", "ls": ":"},
    "LVLM on every image": {"color": "tab:green", "ls": "-."},
    "chance": {"color": "0.5", "ls": "--"},
}
TITLE_WIDTH = 60  # characters per title line at fontsize 9 on a 5.5-inch figure

# One style for every figure a study writes: a paper's column width, readable fonts, vector beside PNG.
PAPER_STYLE = {
    "figure.figsize": (5.5, 3.8),
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 7,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "savefig.dpi": 200,
    "pdf.fonttype": 42,  # TrueType in the PDF: editable text, accepted by conference checkers
}


def in_paper_style(make):
    """A figure function drawn under :data:`PAPER_STYLE` (every figure of the project in one style)."""

    @functools.wraps(make)
    def draw(*args, **kwargs):
        with plt.rc_context(PAPER_STYLE):
            return make(*args, **kwargs)

    return draw


def _finite_taus(rows: list[dict]) -> list[dict]:
    return [r for r in rows if math.isfinite(r["tau"])]


def wrap_title(title: str, width: int = TITLE_WIDTH) -> str:
    """Break a long run name into lines of at most ``width`` characters, preferring its ``_`` and ``-``."""
    lines: list[str] = []
    rest = title
    while len(rest) > width:
        cut = max(rest.rfind("_", 0, width), rest.rfind("-", 0, width), rest.rfind(" ", 0, width))
        cut = cut + 1 if cut > 0 else width  # keep the separator at the end of the line
        lines.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    lines.append(rest)
    return "\n".join(lines)


def sweep_references(methods: dict, num_classes: int) -> dict[str, float]:
    """The reference accuracies (fractions) of a run's ``methods`` (metrics.json) and its class count."""
    refs: dict[str, float] = {}
    clip = (methods.get("clip") or {}).get("acc1")
    lvlm = (methods.get("lvlm_all") or {}).get("acc1")
    if clip is not None and math.isfinite(clip):
        refs["CLIP only"] = float(clip)
    if lvlm is not None and math.isfinite(lvlm):
        refs["LVLM on every image"] = float(lvlm)
    if num_classes > 0:
        refs["chance"] = 1.0 / num_classes
    return refs


def _draw_references(ax, references: dict[str, float] | None) -> None:
    for name, value in (references or {}).items():
        style = REFERENCE_STYLES.get(name, {"color": "0.3", "ls": "--"})
        ax.axhline(100 * value, lw=1, label=f"{name} ({100 * value:.1f}%)", **style)


def _finish(fig, ax, title: str, legend_loc: str = "best") -> None:
    ax.set_title(wrap_title(title), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc=legend_loc)
    fig.tight_layout()


@in_paper_style
def accuracy_vs_deferral_figure(
    rows: list[dict],
    title: str,
    operating_point: dict | None = None,
    references: dict[str, float] | None = None,
):
    """Top-1 accuracy against the share of images sent to the LVLM (0% = CLIP only, 100% = LVLM on all)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    pts = sorted(rows, key=lambda r: r["deferral"])
    ax.plot([100 * r["deferral"] for r in pts], [100 * r["acc1"] for r in pts], marker=".", label="cascade")
    if operating_point:
        ax.scatter([100 * operating_point["deferral"]], [100 * operating_point["acc1"]], color="red", zorder=3,
                   label=f"tau={operating_point['tau']:.3g}")  # fmt: skip
    _draw_references(ax, references)
    ax.set_xlim(-2, 102)
    ax.set_xlabel("images sent to the LVLM (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    _finish(fig, ax, title)
    return fig


@in_paper_style
def accuracy_vs_tau_figure(
    rows: list[dict],
    title: str,
    operating_point: dict | None = None,
    references: dict[str, float] | None = None,
):
    """Top-1 accuracy (and the share sent to the LVLM, right axis) against the entropy threshold tau."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    pts = sorted(_finite_taus(rows), key=lambda r: r["tau"])
    taus = [r["tau"] for r in pts]
    ax.plot(taus, [100 * r["acc1"] for r in pts], marker=".", label="cascade")
    ax2 = ax.twinx()
    ax2.plot(taus, [100 * r["deferral"] for r in pts], color="gray", ls="--", lw=1)
    ax2.set_ylim(-2, 102)
    ax2.set_ylabel("images sent to the LVLM (%, dashed)")
    if operating_point and math.isfinite(operating_point.get("tau", math.nan)):
        ax.axvline(operating_point["tau"], color="red", lw=1, label=f"tau={operating_point['tau']:.3g}")
    _draw_references(ax, references)
    positive = [t for t in taus if t > 0]
    if positive and max(positive) / min(positive) > 20:  # thresholds over decades: a symlog axis
        ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xlabel("entropy threshold tau (nats, symmetric log scale)")
    else:
        ax.set_xlabel("entropy threshold tau (nats)")
    if taus:
        lo, hi = min(taus), max(taus)
        ax.set_xlim(lo, hi) if hi > lo else ax.set_xlim(lo - 0.5, hi + 0.5)
    _finish(fig, ax, title)
    return fig


def save_sweep_plots(
    rows: list[dict],
    out_dir: str | Path,
    title: str,
    operating_point: dict | None = None,
    references: dict[str, float] | None = None,
) -> list[Path]:
    """``accuracy_vs_deferral.png`` and ``accuracy_vs_tau.png`` in ``out_dir``, each with its PDF and the
    JSON of what it draws beside it (written atomically); returns the PNGs' paths."""
    data = {"title": title, "sweep": rows, "operating_point": operating_point, "references": references}
    paths = []
    for name, make in (
        ("accuracy_vs_deferral.png", accuracy_vs_deferral_figure),
        ("accuracy_vs_tau.png", accuracy_vs_tau_figure),
    ):
        fig = make(rows, title, operating_point, references)
        paths.append(save_figure(fig, Path(out_dir) / name, data)["png"])
    return paths


# ------------------------------------------------------------------------------ figures across runs
VECTOR_FORMAT = "pdf"
SENT_GRID = [i / 100 for i in range(101)]  # the shared x axis of seed bands: fraction sent, 0..1


def save_figure(fig, path: str | Path, data: dict) -> dict[str, Path]:
    """``path`` (PNG), the same figure as PDF beside it, and ``<stem>.json``: the data drawn, so a
    figure can be checked against its table or redrawn elsewhere. Each written atomically."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "png": path,
        VECTOR_FORMAT: path.with_suffix(f".{VECTOR_FORMAT}"),
        "data": path.with_suffix(".json"),
    }
    for fmt in ("png", VECTOR_FORMAT):
        with atomic_path(out[fmt]) as tmp:
            fig.savefig(tmp, format=fmt, dpi=PAPER_STYLE["savefig.dpi"])
    with atomic_path(out["data"]) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str))
    plt.close(fig)
    return out


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for one value: no band to draw)."""
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def accuracy_at_sent(rows: list[dict], grid: list[float] = SENT_GRID) -> list[float]:
    """A sweep's top-1 accuracy (%) at each fraction sent in ``grid``, linearly interpolated between its
    points (seeds have different thresholds; on a shared x axis they can be averaged)."""
    import numpy as np

    pts = sorted((r["deferral"], r["acc1"]) for r in rows)
    x = np.array([p[0] for p in pts], dtype=float)
    y = np.array([100 * p[1] for p in pts], dtype=float)
    return [float(v) for v in np.interp(grid, x, y)]


def study_title(what: str, identities: list[dict]) -> str:
    """``<what>: <datasets>, CLIP <models>, LVLM <models>, k <ks>`` from the runs' parameters."""

    def values(*keys):
        return sorted({str(i.get(k)) for i in identities for k in keys if i.get(k) not in (None, "")})

    parts = [", ".join(values("dataset"))]
    if values("clip_model", "model_name"):
        parts.append("CLIP " + ", ".join(values("clip_model", "model_name")))
    if values("lvlm_model"):
        parts.append("LVLM " + ", ".join(Path(v).name for v in values("lvlm_model")))
    if values("shots") and len(values("shots")) == 1:
        parts.append(f"k={values('shots')[0]}")
    return f"{what}: " + "; ".join(p for p in parts if p)


@in_paper_style
def accuracy_vs_sent_figure(series: list[dict], title: str, references: dict[str, float] | None = None):
    """Several cascades' accuracy against the share of images sent to the LVLM, one line each (mean over
    seeds) with a ±1 std band where there are several seeds, and each one's operating point.

    ``series``: ``{"label", "grid", "mean", "std" (or None), "operating_point": {"deferral", "acc1"}}``
    in percent."""
    fig, ax = plt.subplots(layout="constrained")
    for s in series:
        (line,) = ax.plot(s["grid"], s["mean"], label=s["label"])
        if s.get("std") is not None:
            lo = [m - d for m, d in zip(s["mean"], s["std"], strict=True)]
            hi = [m + d for m, d in zip(s["mean"], s["std"], strict=True)]
            ax.fill_between(s["grid"], lo, hi, alpha=0.2, color=line.get_color(), lw=0)
        op = s.get("operating_point")
        if op:
            ax.scatter([op["deferral"]], [op["acc1"]], color=line.get_color(), marker="o", zorder=3)
    _draw_references(ax, references)
    ax.set_xlim(-2, 102)
    ax.set_xlabel("images sent to the LVLM (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(wrap_title(title))
    ax.legend(loc="best")
    return fig


@in_paper_style
def accuracy_vs_k_figure(series: dict[str, list[tuple[int, float, float | None]]], title: str):
    """Accuracy against k, one line per method with a mean ± std band over seeds. ``series``: label ->
    [(k, mean, std or None)] in percent; k = 0 is zero-shot (kept on a symmetric-log axis)."""
    fig, ax = plt.subplots(layout="constrained")
    ks = sorted({k for pts in series.values() for k, _, _ in pts})
    for label, pts in sorted(series.items()):
        pts = sorted(pts)
        x = [k for k, _, _ in pts]
        mean = [m for _, m, _ in pts]
        (line,) = ax.plot(x, mean, marker="o", label=label)
        if any(s is not None for _, _, s in pts):
            ax.fill_between(x, [m - (s or 0.0) for _, m, s in pts], [m + (s or 0.0) for _, m, s in pts],
                            alpha=0.2, color=line.get_color(), lw=0)  # fmt: skip
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (labelled images per class)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(wrap_title(title))
    ax.legend(loc="best")
    return fig
