"""PNG plots of a threshold sweep (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cascadevlm.records import atomic_path


def _finite_taus(rows: list[dict]) -> list[dict]:
    return [r for r in rows if math.isfinite(r["tau"])]


def accuracy_vs_deferral_figure(rows: list[dict], title: str, operating_point: dict | None = None):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    pts = sorted(rows, key=lambda r: r["deferral"])
    ax.plot([100 * r["deferral"] for r in pts], [100 * r["acc1"] for r in pts], marker=".", label="cascade")
    if operating_point:
        ax.scatter([100 * operating_point["deferral"]], [100 * operating_point["acc1"]], color="red", zorder=3,
                   label=f"tau={operating_point['tau']:.3g}")  # fmt: skip
    ax.set_xlabel("images sent to the LVLM (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_vs_tau_figure(rows: list[dict], title: str):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    pts = sorted(_finite_taus(rows), key=lambda r: r["tau"])
    ax.plot([r["tau"] for r in pts], [100 * r["acc1"] for r in pts], marker=".", label="accuracy")
    ax2 = ax.twinx()
    ax2.plot(
        [r["tau"] for r in pts], [100 * r["deferral"] for r in pts], color="gray", ls="--", label="deferred"
    )
    ax.set_xlabel("entropy threshold tau (nats)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax2.set_ylabel("images sent to the LVLM (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_sweep_plots(
    rows: list[dict], out_dir: str | Path, title: str, operating_point: dict | None = None
) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in (
        ("accuracy_vs_deferral.png", accuracy_vs_deferral_figure(rows, title, operating_point)),
        ("accuracy_vs_tau.png", accuracy_vs_tau_figure(rows, title)),
    ):
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        paths.append(out_dir / name)
    return paths
