"""Reports from records alone: tables across runs, TensorBoard contents."""

import csv
import io
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cascadevlm.report.tables import aggregate, collect_results, to_markdown, write_results_tables


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
    assert agg[("0-shot", "cascade")]["seeds"] == 1 and agg[("0-shot", "cascade")]["acc1_std"] is None
    paths = write_results_tables(dirs, tmp_path / "tables")
    md = paths["markdown"].read_text()
    assert "| cub200 | 4-shot | clip | 2 | 52.00 ± 2.83 | 0.0 |" in md
    assert paths["csv"].read_text().splitlines()[0].startswith("dataset,setting,method,seeds,acc1_mean")
    assert "| cub200 | 0-shot | clip | 1 | 40.00 | 0.0 |" in md  # one seed: no ± at all
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
    # tau = +-inf has no point on the tau curve (a 1e9 stand-in flattened the real one)
    assert [(e.step, e.value) for e in acc.Scalars("sweep/tau")] == [(400, pytest.approx(0.5))]
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


# ------------------------------------------------------------------------------ the results index
def _eval_payload(seed=1, acc=0.6, **changes) -> dict:
    """evaluate.py's metrics.json as a real run writes it (params + resolved config), with ``changes``
    as dotted config keys (``cascade.budget``) or params keys (``images``)."""
    params = {"dataset": "fashion_mnist", "split": "test", "images": 40, "classes": 10,
              "clip_model": "cascadevlm-tiny-vit", "clip_pretrained": "/w/clip.safetensors",
              "clip_precision": "fp32", "adapter": None, "adapter_method": None, "adapter_selection": None,
              "adapter_mix": None, "shots": 0, "seed": seed, "lvlm": "x.FakeLVLM", "lvlm_model": "fake-lvlm",
              "lvlm_mode": "score", "tau": 0.5, "gate": "config", "lvlm_on": "all", "topk": 5,
              "lvlm_calls": 40, "devices": 1}  # fmt: skip
    config = {"seed_everything": 0, "trainer": {"accelerator": "cpu", "devices": 1, "precision": None},
              "model": {"model_name": "cascadevlm-tiny-vit", "pretrained": "/w/clip.safetensors",
                        "precision": "fp32", "topk": 5, "adapter": None, "adapter_mix": 1.0},
              "data": {"dataset": "fashion_mnist", "split": "test", "limit": 40, "shots": 0, "seed": seed,
                       "batch_size": 32, "num_workers": 0, "data_root": "/d", "splits_dir": "artifacts/splits"},
              "output_dir": "runs", "run_name": None, "cache_dir": "artifacts/cache",
              "cascade": {"tau": 0.5, "budget": None, "budget_split": "val", "topk": 5, "lvlm_on": "all",
                          "gate": "entropy", "calibration": "none", "lvlm_batch_size": 8, "sweep_points": 100},
              "lvlm": {"class_path": "x.FakeLVLM",
                       "init_args": {"model": "fake-lvlm", "salt": 0, "base_url": None, "timeout_s": 60.0}}}  # fmt: skip
    for key, value in changes.items():
        if "." in key or key in config:
            node = config
            *path, leaf = key.split(".")
            for part in path:
                node = node[part]
            node[leaf] = value
        else:
            params[key] = value
    return {"params": params, "config": config,
            "methods": {"clip": {"acc1": acc - 0.1, "deferral": 0.0}, "cascade": {"acc1": acc, "deferral": 0.3}}}  # fmt: skip


def _write(tmp_path, name, payload):
    d = tmp_path / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(payload))
    return d


def test_four_seed_1_runs_of_different_settings_are_four_rows_without_spread(tmp_path):
    # the example: two budgets, a validation-split run, two sizes; all seed 1 (was "seeds 4: 61.95 ± 3.38")
    dirs = [
        _write(tmp_path, "budget0.1", _eval_payload(acc=0.60, **{"cascade.budget": 0.1})),
        _write(tmp_path, "budget0.3", _eval_payload(acc=0.64, **{"cascade.budget": 0.3})),
        _write(tmp_path, "val", _eval_payload(acc=0.58, split="val", **{"data.split": "val"})),
        _write(tmp_path, "n80", _eval_payload(acc=0.66, images=80, **{"data.limit": 80})),
    ]
    agg = aggregate(collect_results(dirs))
    cascade = [r for r in agg if r["method"] == "cascade"]
    assert len(cascade) == 4 and all(r["seeds"] == 1 and r["acc1_std"] is None for r in cascade)
    assert sorted(r["acc1_mean"] for r in cascade) == pytest.approx([58.0, 60.0, 64.0, 66.0])
    assert sorted(tuple(r["runs"]) for r in cascade) == sorted((str(d),) for d in dirs)
    paths = write_results_tables(dirs, tmp_path / "tables")
    md = paths["markdown"].read_text()
    assert "±" not in md
    head = md.splitlines()[0]
    assert all(c in head for c in ("| budget |", "| data.split |", "| data.limit |", "| runs |"))
    # every row's footnote names its run; the CSV keeps full precision and the runs
    for d in dirs:
        assert f"seeds 1: {d}" in md
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(rows) == 8 and {r["runs"] for r in rows} == {str(d) for d in dirs}
    clip_rows = [r for r in rows if r["method"] == "clip"]
    assert sorted(float(r["acc1_mean"]) for r in clip_rows) == sorted(
        100 * (a - 0.1) for a in (0.6, 0.64, 0.58, 0.66)
    )
    assert json.loads(paths["json"].read_text())[0]["identity_fields"]["kind"] == "cascade"


def test_runs_differing_only_in_seed_and_where_they_ran_are_averaged(tmp_path):
    dirs = [
        _write(tmp_path, "s1", _eval_payload(seed=1, acc=0.60)),
        _write(tmp_path, "s2", _eval_payload(seed=2, acc=0.64, **{"output_dir": "elsewhere", "run_name": "k0_s2",
               "cache_dir": "/c", "data.batch_size": 8, "trainer.devices": 2, "lvlm.init_args.base_url": "http://h:1"})),
        _write(tmp_path, "salt", _eval_payload(seed=3, acc=0.9, **{"lvlm.init_args.salt": 1})),  # another LVLM setting
    ]  # fmt: skip
    agg = [r for r in aggregate(collect_results(dirs)) if r["method"] == "cascade"]
    assert [(r["seeds"], r["runs"]) for r in agg] == [(2, [str(dirs[0]), str(dirs[1])]), (1, [str(dirs[2])])] or \
        [(r["seeds"], r["runs"]) for r in agg] == [(1, [str(dirs[2])]), (2, [str(dirs[0]), str(dirs[1])])]  # fmt: skip
    two = next(r for r in agg if r["seeds"] == 2)
    assert two["acc1_mean"] == pytest.approx(62.0) and two["acc1_std"] == pytest.approx(2.8284271, rel=1e-6)
    assert two["seed_list"] == [1, 2]


def test_the_same_settings_and_seed_twice_are_refused(tmp_path):
    dirs = [_write(tmp_path, "a", _eval_payload()), _write(tmp_path, "b", _eval_payload(acc=0.7))]
    with pytest.raises(
        ValueError, match=r"runs .*/a, .*/b have the same settings and seed 1 \(the same experiment twice\)"
    ):
        aggregate(collect_results(dirs))


def test_adapter_runs_have_an_identity_and_rows(tmp_path):
    base = {"method": "linear_probe", "model_name": "m", "weights_id": "sha256:x", "dataset": "d", "shots": 4,
            "selection": "val_split", "val_acc": 0.5, "test_acc": 0.55, "zero_shot_test_acc": 0.4}  # fmt: skip
    dirs = [_write(tmp_path, "s1", {**base, "seed": 1}), _write(tmp_path, "s2", {**base, "seed": 2, "test_acc": 0.65}),
            _write(tmp_path, "k8", {**base, "seed": 1, "shots": 8})]  # fmt: skip
    agg = {(r["setting"], r["method"]): r for r in aggregate(collect_results(dirs))}
    assert agg[("4-shot", "clip (linear_probe)")]["acc1_mean"] == pytest.approx(60.0)
    assert agg[("4-shot", "clip (linear_probe)")]["seeds"] == 2
    assert agg[("8-shot", "clip (linear_probe)")]["seeds"] == 1


def test_connection_fields_of_every_backend_are_left_out_of_the_identity():
    from cascadevlm.lvlm.api_backend import OpenAIBackend
    from cascadevlm.lvlm.transformers_backend import TransformersBackend
    from cascadevlm.report.tables import LVLM_CONNECTION_FIELDS
    from cascadevlm.testing.fake_lvlm import FakeLVLM

    backends = (OpenAIBackend, TransformersBackend, FakeLVLM)
    # no more either: a field left out that some backend's answers depend on would merge rows
    assert set().union(*(b.CONNECTION_FIELDS for b in backends)) == LVLM_CONNECTION_FIELDS


def test_columns_show_what_tells_rows_apart(tmp_path):
    # k0 has no adapter; the adapter runs' training settings are shown only where they vary among them
    zero = _eval_payload(acc=0.5)
    dirs = [_write(tmp_path, "k0", zero)]
    for name, lr in (("lr1", 0.1), ("lr2", 0.01)):
        adapter = tmp_path / name / "adapter.safetensors"
        adapter.parent.mkdir()
        (adapter.parent / "adapter.yaml").write_text(f"model:\n  init_args:\n    lr: {lr}\ndata:\n  init_args:\n"
                                                     "    dataset: fashion_mnist\n    seed: 1\n")  # fmt: skip
        payload = _eval_payload(
            acc=0.6, shots=2, adapter_method="linear_probe", **{"model.adapter": str(adapter)}
        )
        dirs.append(_write(tmp_path, f"{name}_eval", payload))
    agg = aggregate(collect_results(dirs))
    assert len(agg) == 6  # (zero-shot, lr 0.1, lr 0.01) x (clip, cascade): lr splits the adapter runs
    md = to_markdown(agg)
    head = md.splitlines()[0]
    assert "| train.model.init_args.lr |" in head and "dataset |" not in head.split("| setting")[1]
    assert "| identity |" not in head  # every row reads differently already
    same = [_write(tmp_path / "b", "x", _eval_payload(acc=0.5, images=40, **{"cascade.alpha": 0.2})),
            _write(tmp_path / "b", "y", _eval_payload(acc=0.5, images=40, **{"cascade.alpha": None}))]  # fmt: skip
    head = to_markdown(aggregate(collect_results(same))).splitlines()[0]
    assert "| identity |" in head  # alpha None vs 0.2: only the hash tells the rows apart


def test_a_run_that_selected_on_the_evaluated_images_says_so_in_every_table(tmp_path):
    # cascade.allow_selection_on_eval: tau fitted on the very images measured; never a plain "cascade" row
    dirs = [
        _write(tmp_path, "honest", _eval_payload(acc=0.60, **{"cascade.budget": 0.3})),
        _write(tmp_path, "on_eval", _eval_payload(acc=0.64, selection_on_eval=True,
                                                  **{"cascade.budget": 0.3, "cascade.budget_split": "test"})),
    ]  # fmt: skip
    agg = aggregate(collect_results(dirs))
    marked = "cascade [selected on the evaluated images]"
    assert sorted(r["method"] for r in agg) == sorted(["clip", "clip", "cascade", marked])
    assert next(r for r in agg if r["method"] == marked)["runs"] == [str(dirs[1])]
    paths = write_results_tables(dirs, tmp_path / "tables")
    assert marked in paths["markdown"].read_text() and marked in paths["csv"].read_text()


def test_stages_runs_of_one_setting_share_an_identity_whatever_their_budget_chose():
    """Two seeds of one cascade.stages setting under a cost budget: the thresholds, the combination and the
    calls per stage are outcomes (params), so the rows average; another budget is another setting."""
    from cascadevlm.report.tables import run_identity

    cfg = {"cascade": {"stages": [{"name": "small", "lvlm": "s.yaml"}, {"name": "big", "lvlm": "b.yaml"}],
                       "cost_budget": 13.3, "cost_unit": "seconds"}, "data": {"seed": 1}}  # fmt: skip

    def payload(seed, thresholds, combination, calls, budget=13.3):
        config = {**cfg, "cascade": {**cfg["cascade"], "cost_budget": budget}, "data": {"seed": seed}}
        params = {"dataset": "d", "seed": seed, "lvlm": "small > big", "stages": ["small", "big"],
                  "combination": combination, "tau": thresholds[0], "thresholds": thresholds,
                  "cost_budget": budget, "lvlm_calls": sum(calls.values()), "lvlm_calls_by_stage": calls}  # fmt: skip
        return {"params": params, "config": config}

    a = payload(1, [0.4, 0.2], ["clip", "big"], {"small": 0, "big": 900})
    b = payload(2, [0.5, 0.1], ["clip", "small", "big"], {"small": 700, "big": 300})
    assert run_identity(a) == run_identity(b)
    assert run_identity(payload(1, [0.4, 0.2], ["clip", "big"], {}, budget=20.0)) != run_identity(a)
