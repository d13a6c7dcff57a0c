"""The run's curves, plots and tables in TensorBoard (``tensorboard --logdir runs``)."""

from __future__ import annotations

import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from cascadevlm.report.plots import accuracy_vs_deferral_figure, accuracy_vs_tau_figure


def write_tensorboard(
    log_dir: str | Path, sweep_rows: list[dict], metrics: dict, summary_md: str, title: str
) -> Path:
    """Sweep curves as scalars (step = position in the sweep, from CLIP-only to LVLM-on-all), the two
    plots as figures, the headline metrics as scalars and the summary table as text."""
    log_dir = Path(log_dir)
    w = SummaryWriter(str(log_dir))
    try:
        for step, row in enumerate(sorted(sweep_rows, key=lambda r: r["deferral"])):
            w.add_scalar("sweep/acc1", row["acc1"], step)
            w.add_scalar("sweep/mean_per_class_recall", row["mean_per_class_recall"], step)
            w.add_scalar("sweep/deferral", row["deferral"], step)
            tau = row["tau"]
            w.add_scalar("sweep/tau", tau if math.isfinite(tau) else (1e9 if tau > 0 else -1e9), step)
            w.add_scalar("sweep/acc1_at_deferral_permille", row["acc1"], int(round(1000 * row["deferral"])))
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                w.add_scalar(f"metrics/{k}", float(v), 0)
        if sweep_rows:
            w.add_figure("plots/accuracy_vs_deferral", accuracy_vs_deferral_figure(sweep_rows, title), 0)
            w.add_figure("plots/accuracy_vs_tau", accuracy_vs_tau_figure(sweep_rows, title), 0)
        w.add_text("summary", summary_md, 0)
    finally:
        w.close()
    return log_dir
