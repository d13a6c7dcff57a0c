"""report/plots.py: the accuracy-vs-tau curve spread over its axis, reference lines, whole titles."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from cascadevlm.report.plots import (
    accuracy_vs_deferral_figure,
    accuracy_vs_tau_figure,
    save_sweep_plots,
    sweep_references,
    wrap_title,
)

# A run's title is its directory name: long, no spaces.
TITLE = "fashion_mnist_cascadevlm-tiny-vit_clip_test_k0_llava_score_lvde7704f8_budget0.3-val_all_top5_n2000"


def _confident_sweep() -> list[dict]:
    """A sweep of a confident CLIP: most thresholds (entropy quantiles) within 1e-4 nats of zero."""
    taus = np.geomspace(1e-6, 2.0, 40)[::-1]
    rows = [{"tau": math.inf, "deferral": 0.0, "acc1": 0.6, "mean_per_class_recall": 0.6}]
    for i, t in enumerate(taus):
        f = (i + 1) / (len(taus) + 1)
        rows.append({"tau": float(t), "deferral": f, "acc1": 0.6 + 0.2 * f, "mean_per_class_recall": 0.6})
    rows.append({"tau": -math.inf, "deferral": 1.0, "acc1": 0.8, "mean_per_class_recall": 0.8})
    return rows


REFS = sweep_references({"clip": {"acc1": 0.6}, "lvlm_all": {"acc1": 0.8}}, num_classes=10)


def _curve_positions(ax) -> np.ndarray:
    """The cascade curve's x positions as fractions of the axis width (0 = left edge, 1 = right)."""
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "cascade"]
    xy = np.column_stack([line.get_xdata(), line.get_ydata()])
    return ax.transAxes.inverted().transform(ax.transData.transform(xy))[:, 0]


def test_accuracy_vs_tau_spreads_the_curve_over_the_axis():
    fig = accuracy_vs_tau_figure(_confident_sweep(), TITLE, references=REFS)
    ax = fig.axes[0]
    x = _curve_positions(ax)
    assert x.min() >= -1e-9 and x.max() <= 1 + 1e-9  # every point inside the plotted range
    assert x.max() - x.min() > 0.95  # which the data spans
    # the middle half of the thresholds is not squashed at one end (on a linear axis it is: < 0.01)
    q1, q3 = np.quantile(x, [0.25, 0.75])
    assert q3 - q1 > 0.3
    plt.close(fig)


@pytest.mark.parametrize("make", [accuracy_vs_tau_figure, accuracy_vs_deferral_figure])
def test_reference_lines_and_a_whole_title(make):
    fig = make(_confident_sweep(), TITLE, references=REFS)
    ax = fig.axes[0]
    refs = {ln.get_label().split(" (")[0]: sorted(set(ln.get_ydata())) for ln in ax.get_lines()}
    assert refs["CLIP only"] == [pytest.approx(60.0)]  # horizontal lines at the reference accuracies
    assert refs["LVLM on every image"] == [pytest.approx(80.0)]
    assert refs["chance"] == [pytest.approx(10.0)]
    legend = {t.get_text().split(" (")[0] for t in ax.get_legend().get_texts()}
    assert {"cascade", "CLIP only", "LVLM on every image", "chance"} <= legend

    fig.canvas.draw()
    box = ax.title.get_window_extent(fig.canvas.get_renderer())
    width, height = fig.canvas.get_width_height()
    assert box.x0 >= 0 and box.x1 <= width and box.y1 <= height  # not cut at the figure's edge
    assert ax.title.get_text().replace("\n", "") == TITLE  # wrapped, nothing dropped
    plt.close(fig)


def test_wrap_title_breaks_at_separators():
    lines = wrap_title(TITLE, 40).split("\n")
    assert "".join(lines) == TITLE and all(len(line) <= 40 for line in lines)
    assert all(line[-1] in "_-" for line in lines[:-1])
    assert wrap_title("short") == "short"


def test_references_from_methods_and_saved_plots(tmp_path):
    assert sweep_references({"clip": {"acc1": 0.5}}, 4) == {"CLIP only": 0.5, "chance": 0.25}
    paths = save_sweep_plots(
        _confident_sweep(), tmp_path, TITLE, {"tau": 0.01, "deferral": 0.3, "acc1": 0.66}, REFS
    )
    assert [p.name for p in paths] == ["accuracy_vs_deferral.png", "accuracy_vs_tau.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
