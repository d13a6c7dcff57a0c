"""The run's curves, plots and tables in TensorBoard (``tensorboard --logdir runs``)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path


def permille(fraction: float) -> int:
    """The share of images sent to the LVLM as an integer step (0..1000): the sweep's x axis."""
    return int(round(1000 * fraction))


def fresh_log_dir(log_dir: str | Path) -> Path:
    """``log_dir`` emptied of an earlier write (a rerun replaces a run's curves rather than doubling them)."""
    log_dir = Path(log_dir)
    if log_dir.exists():
        shutil.rmtree(log_dir)
    log_dir.mkdir(parents=True)
    return log_dir


def sweep_by_permille(rows: list[dict]) -> list[tuple[int, dict]]:
    """One sweep row per permille sent to the LVLM (the first one, in the sweep's order), ascending."""
    out: dict[int, dict] = {}
    for row in rows:
        out.setdefault(permille(row["deferral"]), row)
    return sorted(out.items())


def _hparam_value(v):
    if isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v)):
        return v
    return str(v)  # None, inf, lists: as text, so runs can still be filtered by them


def write_tensorboard(
    log_dir: str | Path,
    sweep_rows: list[dict],
    metrics: dict,
    summary_md: str,
    title: str,
    hparams: dict | None = None,
    operating_point: dict | None = None,
    references: dict[str, float] | None = None,
) -> Path:
    """Write a run's TensorBoard directory afresh (an earlier write of the same run is removed first).

    - ``sweep/acc1``, ``sweep/mean_per_class_recall``, ``sweep/tau``: step = permille of the images sent to
      the LVLM (0 = CLIP only, 1000 = the LVLM on every image), so runs line up on one x axis; the tau
      curve leaves out tau = +-inf (no finite value to draw; a stand-in like 1e9 flattens the curve);
    - ``metrics/<name>``: the headline metrics at step 0;
    - the run's parameters as hparams (the HPARAMS tab compares runs by them, against ``metrics/*``);
    - the two plots as figures and the summary table as text.
    """
    # torch's writer (figures, hparams) imported here: fresh_log_dir's users (the tables) need no torch
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    from cascadevlm.report.plots import accuracy_vs_deferral_figure, accuracy_vs_tau_figure

    log_dir = fresh_log_dir(log_dir)
    w = SummaryWriter(str(log_dir))
    try:
        for step, row in sweep_by_permille(sweep_rows):
            w.add_scalar("sweep/acc1", row["acc1"], step)
            w.add_scalar("sweep/mean_per_class_recall", row["mean_per_class_recall"], step)
            if math.isfinite(row["tau"]):  # tau = +-inf (CLIP only / all sent) has no point on the curve
                w.add_scalar("sweep/tau", row["tau"], step)
        scalars = {}
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                w.add_scalar(f"metrics/{k}", float(v), 0)
                scalars[f"metrics/{k}"] = float(v)
        if hparams:
            exp, ssi, sei = hparams_summary({k: _hparam_value(v) for k, v in hparams.items()}, scalars)
            for summary in (exp, ssi, sei):
                w.file_writer.add_summary(summary)
        if sweep_rows:
            w.add_figure("plots/accuracy_vs_deferral",
                         accuracy_vs_deferral_figure(sweep_rows, title, operating_point, references), 0)  # fmt: skip
            w.add_figure("plots/accuracy_vs_tau",
                         accuracy_vs_tau_figure(sweep_rows, title, operating_point, references), 0)  # fmt: skip
        w.add_text("summary", summary_md, 0)
    finally:
        w.close()
    return log_dir
