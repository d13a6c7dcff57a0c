"""PNG plots of a threshold sweep (matplotlib, headless).

Both plots mark the references a reader compares the cascade with, as horizontal lines: CLIP alone,
the LVLM on every image, and chance (1 / classes). Entropy thresholds of a confident CLIP crowd near
zero, so accuracy against tau is drawn on a symmetric-log axis whose linear part ends at the smallest
positive threshold of the sweep: every point of the curve gets its own room.
"""

from __future__ import annotations

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
    """``accuracy_vs_deferral.png`` and ``accuracy_vs_tau.png`` in ``out_dir`` (written atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in (
        ("accuracy_vs_deferral.png", accuracy_vs_deferral_figure(rows, title, operating_point, references)),
        ("accuracy_vs_tau.png", accuracy_vs_tau_figure(rows, title, operating_point, references)),
    ):
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        paths.append(out_dir / name)
    return paths
