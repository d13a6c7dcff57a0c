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
    import json

    for p in paths:  # a vector copy and the data drawn beside each PNG
        assert p.with_suffix(".pdf").stat().st_size > 1000
        assert json.loads(p.with_suffix(".json").read_text())["operating_point"]["acc1"] == 0.66


# ------------------------------------------------------------------------------ figures across runs
def _study_run(tmp_path, name, seed, acc, sweep_acc, shots=0, salt=0):
    """A finished run: metrics.json (params + the config that tells runs apart) and its sweep.csv."""
    import json

    d = tmp_path / name
    d.mkdir()
    params = {"dataset": "fashion_mnist", "split": "test", "images": 40, "clip_model": "tiny-vit",
              "lvlm_model": "/m/llava", "shots": shots, "seed": seed}  # fmt: skip
    config = {"data": {"seed": seed, "shots": shots}, "lvlm": {"init_args": {"salt": salt}}}
    methods = {"clip": {"acc1": sweep_acc[0], "deferral": 0.0}, "cascade": {"acc1": acc, "deferral": 0.3}}
    (d / "metrics.json").write_text(json.dumps({"params": params, "config": config, "methods": methods}))
    rows = ["tau,deferred,deferral,acc1,mean_per_class_recall"]
    rows += [
        f"{t},{int(40 * f)},{f},{a},{a}"
        for t, f, a in zip((9.0, 1.0, 0.0), (0.0, 0.5, 1.0), sweep_acc, strict=True)
    ]
    (d / "sweep.csv").write_text("\n".join(rows) + "\n")
    return d


def test_figures_data_read_back_equal_the_table(tmp_path):
    import json

    from cascadevlm.report.tables import write_results_tables

    dirs = [
        _study_run(tmp_path, "a1", 1, 0.60, (0.5, 0.7, 0.6)),
        _study_run(tmp_path, "a2", 2, 0.64, (0.5, 0.8, 0.7)),
        _study_run(tmp_path, "b1", 1, 0.70, (0.5, 0.9, 0.8), salt=1),  # another LVLM setting: its own line
        _study_run(tmp_path, "k4", 1, 0.75, (0.6, 0.9, 0.8), shots=4),
    ]
    paths = write_results_tables(dirs, tmp_path / "tables")
    table = json.loads(paths["json"].read_text())
    cascade = {tuple(r["runs"]): r for r in table if r["method"] == "cascade"}
    sent = json.loads(paths["sent_plot"].with_suffix(".json").read_text())
    assert paths["sent_plot"].with_suffix(".pdf").stat().st_size > 1000  # vector beside the PNG
    assert (
        "fashion_mnist" in sent["title"]
        and "CLIP tiny-vit" in sent["title"]
        and "LVLM llava" in sent["title"]
    )
    assert len(sent["series"]) == 3
    for s in sent["series"]:
        row = cascade[tuple(s["runs"])]
        assert s["operating_point"] == {"deferral": row["deferral_mean"], "acc1": row["acc1_mean"]}
        assert (s["std"] is None) == (row["seeds"] == 1)
    two = next(s for s in sent["series"] if len(s["runs"]) == 2)
    assert two["mean"][50] == pytest.approx(75.0) and two["std"][50] == pytest.approx(
        7.0710678
    )  # 70, 80 at 50%
    assert two["mean"][0] == pytest.approx(50.0) and two["std"][0] == pytest.approx(0.0)
    # the k figure: one point per (method, k) row of the table, mean and std as in the table
    k_fig = json.loads(paths["plot"].with_suffix(".json").read_text())
    drawn = sorted((k, m, -1 if s is None else s) for pts in k_fig["series"].values() for k, m, s in pts)
    rows = sorted((int(r["setting"].split("-")[0]), r["acc1_mean"], -1 if r["acc1_std"] is None else r["acc1_std"])
                  for r in table)  # fmt: skip
    assert drawn == rows and len(k_fig["series"]) == 4  # clip and cascade, for each LVLM setting


def test_overlay_figure_draws_what_it_was_given():
    from cascadevlm.report.plots import accuracy_vs_sent_figure

    series = [
        {"label": "a", "grid": [0, 50, 100], "mean": [50, 75, 65], "std": [0, 7, 7], "operating_point": {"deferral": 30, "acc1": 62}},
        {"label": "b", "grid": [0, 50, 100], "mean": [50, 90, 80], "std": None, "operating_point": None},
    ]  # fmt: skip
    fig = accuracy_vs_sent_figure(series, "t")
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["a"].get_ydata()) == [50, 75, 65] and list(lines["b"].get_ydata()) == [50, 90, 80]
    assert len(ax.collections) == 2  # a's band and a's operating point; b has neither
    assert ax.get_xlabel() == "images sent to the LVLM (%)" and ax.get_ylabel() == "top-1 accuracy (%)"
    plt.close(fig)
