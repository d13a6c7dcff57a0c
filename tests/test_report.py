"""Reports from records alone: tables across runs, TensorBoard contents."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cascadevlm.report.tables import aggregate, collect_results, write_results_tables


def _run(tmp_path, name, shots, seed, clip, cascade, deferral):
    d = tmp_path / name
    d.mkdir()
    payload = {
        "params": {"dataset": "cub200", "shots": shots, "seed": seed},
        "methods": {
            "clip": {"acc1": clip, "deferral": 0.0},
            "cascade": {"acc1": cascade, "deferral": deferral},
        },
    }
    (d / "metrics.json").write_text(json.dumps(payload))
    return d


def test_mean_and_std_over_seeds_and_tensorboard_text(tmp_path):
    dirs = [
        _run(tmp_path, "a", 4, 1, 0.50, 0.60, 0.2),
        _run(tmp_path, "b", 4, 2, 0.54, 0.62, 0.3),
        _run(tmp_path, "c", 0, 1, 0.40, 0.45, 0.25),
    ]
    agg = {(r["setting"], r["method"]): r for r in aggregate(collect_results(dirs))}
    assert agg[("4-shot", "clip")]["acc1_mean"] == pytest.approx(52.0)
    assert agg[("4-shot", "clip")]["acc1_std"] == pytest.approx(2.8284271, rel=1e-6)  # sample std of 50, 54
    assert agg[("4-shot", "cascade")]["deferral_mean"] == pytest.approx(25.0)
    assert agg[("0-shot", "cascade")]["seeds"] == 1 and agg[("0-shot", "cascade")]["acc1_std"] == 0.0
    paths = write_results_tables(dirs, tmp_path / "tables")
    md = paths["markdown"].read_text()
    assert "| cub200 | 4-shot | clip | 2 | 52.00 ± 2.83 | 0.0 |" in md
    assert paths["csv"].read_text().splitlines()[0].startswith("dataset,setting,method,seeds,acc1_mean")
    acc = EventAccumulator(str(paths["tensorboard"]), size_guidance={"tensors": 0}).Reload()
    (event,) = acc.Tensors("results/text_summary")
    assert "52.00 ± 2.83" in event.tensor_proto.string_val[0].decode()


def test_run_tensorboard_holds_the_sweep_curve(tmp_path):
    from cascadevlm.report.tensorboard import write_tensorboard

    rows = [
        {"tau": float("inf"), "deferral": 0.0, "acc1": 0.5, "mean_per_class_recall": 0.5},
        {"tau": 0.5, "deferral": 0.4, "acc1": 0.6, "mean_per_class_recall": 0.55},
        {"tau": float("-inf"), "deferral": 1.0, "acc1": 0.55, "mean_per_class_recall": 0.5},
    ]
    log = write_tensorboard(tmp_path / "tb", rows, {"acc1": 0.6}, "# summary", "t")
    acc = EventAccumulator(str(log), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert [e.value for e in acc.Scalars("sweep/acc1")] == pytest.approx([0.5, 0.6, 0.55])
    # step = permille of the images sent to the LVLM
    assert [e.step for e in acc.Scalars("sweep/acc1")] == [0, 400, 1000]
    assert [e.value for e in acc.Scalars("sweep/tau")] == pytest.approx([1e9, 0.5, -1e9])
    assert set(acc.Tags()["images"]) == {"plots/accuracy_vs_deferral", "plots/accuracy_vs_tau"}


def test_deferred_analysis_from_records():
    from cascadevlm.records import PredictionRecord
    from cascadevlm.report.analysis import deferred_analysis

    def rec(i, label, topk, deferred, lvlm=None, fallback=None):
        return PredictionRecord(i, label, topk, [0.5] * len(topk), 1.0, topk[0], deferred, lvlm, None, None,
                                lvlm if deferred else topk[0], fallback)  # fmt: skip

    records = [
        rec(0, 1, [1, 2], False),  # confident, right
        rec(1, 2, [1, 2], True, lvlm=2),  # LVLM fixes it
        rec(2, 1, [1, 2], True, lvlm=2),  # LVLM breaks it
        rec(3, 3, [1, 2], True, lvlm=1, fallback="unparseable"),  # true class outside top-k
    ]
    a = deferred_analysis(records, 4)
    assert (a["images"], a["deferred"], a["deferral"]) == (4, 3, 0.75)
    assert a["topk_coverage_all"] == 0.75 and a["topk_coverage_deferred"] == pytest.approx(2 / 3)
    assert a["deferred_clip_acc1"] == pytest.approx(1 / 3) and a["deferred_lvlm_acc1"] == pytest.approx(1 / 3)
    assert (a["lvlm_fixed"], a["lvlm_broke"]) == (1, 1)
    assert a["fallbacks"] == {"unparseable": 1}
