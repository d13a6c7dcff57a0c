"""evaluate.py applies a chosen gate, candidate-set rule, calibration and fusion (cascade.* routing options)."""

from __future__ import annotations

import json
import math

import pytest
from fake_cascade import fake_args

from cascadevlm.cascade.evaluate import NEEDS_VAL_ANSWERS, combine
from cascadevlm.cli import run_evaluate as main
from cascadevlm.gating.routing import RoutingOptions, apply_routing, fit_routing
from cascadevlm.records import read_records
from cascadevlm.testing.fake_lvlm import FakeLVLM

pytestmark = pytest.mark.usefixtures("clean_fake_lvlm")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One feature cache for the module: the 5,000 validation images are encoded once."""
    return tmp_path_factory.mktemp("features")


def _run(tiny_clip_path, data_root, out, cache_dir, *extra, name=None):
    """A run under ``out`` (default run name unless ``name``); returns (metrics.json, run directory)."""
    # the answer store off: these tests count the LVLM requests of each run, and the module's runs share
    # cache_dir (where the store would answer a repeated image)
    args = fake_args(tiny_clip_path, data_root, out, name, "--cache_dir", str(cache_dir), "--answer_store", "null", *extra)
    payload = main(args)
    (run_dir,) = [d for d in out.iterdir() if d.is_dir() and d.name != "cache"]
    return payload, run_dir


def test_defaults_and_lvlm_on_val_leave_the_paper_cascade_unchanged(
    tiny_clip_path, data_root, tmp_path, cache_dir
):
    base, base_dir = _run(tiny_clip_path, data_root, tmp_path / "a", cache_dir, "--cascade.tau", "1.5")
    calls_base = len(FakeLVLM.log)
    FakeLVLM.log.clear()
    # the paper's routing spelled out, alpha (unused by top-k) changed, and the LVLM on the validation images
    same, same_dir = _run(tiny_clip_path, data_root, tmp_path / "b", cache_dir, "--cascade.tau", "1.5",
                          "--cascade.gate", "entropy", "--cascade.calibration", "none",
                          "--cascade.candidates", "topk", "--cascade.fusion", "none", "--cascade.alpha", "0.3",
                          "--cascade.lvlm_on_val", "true")  # fmt: skip
    assert same_dir.name == base_dir.name  # the run name did not change
    assert read_records(same_dir / "records.parquet") == read_records(base_dir / "records.parquet")
    assert same["metrics"] == base["metrics"] and same["methods"] == base["methods"]
    assert "routing" not in base and "routing" not in same
    assert not (base_dir / "val_records.parquet").exists()
    val = read_records(same_dir / "val_records.parquet")
    assert len(val) == 5000 and all(r.lvlm_choice is not None for r in val)
    assert same["params"]["lvlm_calls_val"] == 5000 and len(FakeLVLM.log) == calls_base + 5000
    assert (same_dir / "gates" / "gates.json").exists()
    assert base["params"]["gate_score"] == "entropy" and base["params"]["fusion"] == "none"


def test_margin_gate_with_a_budget_sends_what_fit_routing_decides(
    tiny_clip_path, data_root, tmp_path, cache_dir
):
    out, run_dir = _run(tiny_clip_path, data_root, tmp_path, cache_dir, "--cascade.gate", "margin",
                        "--cascade.budget", "0.3", "--cascade.lvlm_on", "deferred")  # fmt: skip
    assert "gmargin" in run_dir.name
    assert out["gate"]["budget_split_deferral"] <= 0.3
    val = read_records(run_dir / "val_records.parquet")
    clip = read_records(run_dir / "clip_records.parquet")
    sent, _ = fit_routing(val, RoutingOptions(gate="margin", budget=0.3, topk=5), 10).decide(clip)
    expected = {r.index for r, s in zip(clip, sent, strict=True) if s}
    assert 0 < len(expected) < len(clip)
    assert len(FakeLVLM.log) == len(expected) == out["params"]["lvlm_calls"]
    records = read_records(run_dir / "records.parquet")
    assert {r.index for r in records if r.deferred} == expected
    assert out["routing"]["gate"] == "margin" and out["params"]["gate_score"] == "margin"
    assert out["methods"]["cascade"]["deferral"] == pytest.approx(len(expected) / len(records))


def test_learned_gate_needs_lvlm_on_val_and_uses_it(tiny_clip_path, data_root, tmp_path, cache_dir):
    with pytest.raises(ValueError) as err:
        main(fake_args(tiny_clip_path, data_root, tmp_path / "x", "r", "--cascade.gate", "learned"))
    assert str(err.value) == NEEDS_VAL_ANSWERS
    assert str(err.value) == (
        "cascade.gate=learned / cascade.fusion=logprob without fusion_weight need LVLM answers on the validation "
        "images: set --cascade.lvlm_on_val true (one LVLM call per validation image)"
    )
    assert not (tmp_path / "x").exists() and FakeLVLM.log == []

    out, run_dir = _run(tiny_clip_path, data_root, tmp_path / "y", cache_dir, "--cascade.gate", "learned",
                        "--cascade.budget", "0.2", "--cascade.lvlm_on_val", "true")  # fmt: skip
    assert (run_dir / "val_records.parquet").exists()
    assert (
        out["routing"]["gate"] == "learned"
        and out["routing"]["threshold_source"] == "budget 0.2 on validation"
    )
    assert "glearned" in run_dir.name
    # the final records are apply_routing's on the run's own records
    val = read_records(run_dir / "val_records.parquet")
    clip = read_records(run_dir / "clip_records.parquet")
    answered = combine(clip, {}, math.inf, 5)
    for r, full in zip(answered, read_records(run_dir / "records.parquet"), strict=True):
        r.lvlm_choice, r.lvlm_raw, r.lvlm_scores, r.fallback = (
            full.lvlm_choice, full.lvlm_raw, full.lvlm_scores, full.fallback)  # fmt: skip
    ref, _ = apply_routing(answered, val, RoutingOptions(gate="learned", budget=0.2, topk=5), 10)
    got = read_records(run_dir / "records.parquet")
    assert [(r.deferred, r.final) for r in got] == [(r.deferred, r.final) for r in ref]


def test_fusion_and_calibration_land_in_params_routing_and_the_run_name(
    tiny_clip_path, data_root, tmp_path, cache_dir
):
    out, run_dir = _run(tiny_clip_path, data_root, tmp_path, cache_dir, "--cascade.tau=-inf",
                        "--cascade.calibration", "temperature", "--cascade.fusion", "logprob",
                        "--cascade.fusion_weight", "0.4", "--cascade.candidates", "aps",
                        "--cascade.alpha", "0.2")  # fmt: skip
    p = out["params"]
    assert (p["calibration"], p["fusion"], p["fusion_weight"], p["candidates"], p["alpha"]) == (
        "temperature", "logprob", 0.4, "aps", 0.2)  # fmt: skip
    assert all(s in run_dir.name for s in ("temp", "aps0.2", "fuse0.4"))
    assert out["routing"]["temperature"] != 1.0 and out["routing"]["fusion_weight"] == 0.4
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["params"]["fusion_weight"] == 0.4 and saved["routing"]["candidates"] == "aps"
    # the final answers are apply_routing's on the run's own records
    recs = read_records(run_dir / "records.parquet")
    val = read_records(run_dir / "val_records.parquet")
    ro = RoutingOptions(tau=-math.inf, calibration="temperature", candidates="aps", alpha=0.2,
                        fusion="logprob", fusion_weight=0.4, topk=5)  # fmt: skip
    ref, _ = apply_routing(recs, val, ro, 10)
    assert [r.final for r in recs] == [r.final for r in ref]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cascade.alpha", "0"], "cascade.alpha must be in (0, 1) (target coverage 1 - alpha), got 0.0"),
        (["--cascade.alpha", "1.5"], "cascade.alpha must be in (0, 1) (target coverage 1 - alpha), got 1.5"),
        (["--cascade.fusion", "logprob", "--cascade.fusion_weight", "2"],
         "cascade.fusion_weight must be in [0, 1] (1 = the LVLM decides), got 2.0"),
        (["--cascade.fusion", "logprob"], NEEDS_VAL_ANSWERS),
        (["--cascade.candidates", "raps", "--cascade.budget_split", "dev"],
         "dataset 'fashion_mnist' has no split 'dev' to fit the routing on (cascade.budget_split); it has "
         "['train', 'val', 'test']: set --cascade.budget_split"),
        (["--lvlm", "null", "--cascade.gate", "margin"],
         "cascade.gate/calibration/candidates/fusion route images to an LVLM but none is configured: set --lvlm, "
         "or keep --cascade.gate entropy --cascade.calibration none --cascade.candidates topk --cascade.fusion none"),
        (["--lvlm", "null", "--cascade.lvlm_on_val", "true"],
         "cascade.lvlm_on_val asks an LVLM about the validation images but none is configured: set --lvlm"),
    ],
)  # fmt: skip
def test_absurd_routing_options_are_refused_before_any_stage(
    tiny_clip_path, data_root, tmp_path, extra, message
):
    with pytest.raises(ValueError) as err:
        main(fake_args(tiny_clip_path, data_root, tmp_path, "r", *extra))
    assert str(err.value) == message
    assert not (tmp_path / "r").exists() and FakeLVLM.log == []


def test_unknown_gate_is_refused_by_the_parser(tiny_clip_path, data_root, tmp_path):
    with pytest.raises(Exception, match="cascade.gate") as err:
        main(fake_args(tiny_clip_path, data_root, tmp_path, "r", "--cascade.gate", "vibes"))
    assert "vibes" in str(err.value)
    assert not (tmp_path / "r").exists() and FakeLVLM.log == []


def test_conformal_quantile_is_the_kth_smallest_calibration_score():
    """Split conformal: qhat is the k-th smallest of n scores, k = ceil((n + 1)(1 - alpha)). Twenty
    two-class images whose label is CLIP's top-1 with probability 0.52, 0.54, ..., 0.90: each APS score
    is that probability; alpha 0.1 gives k = ceil(18.9) = 19, the score 0.88 (the 20th, 0.90, covered
    20/21 = 0.952 of new images instead of 19/21 = 0.905)."""
    import numpy as np

    from cascadevlm.gating.routing import conformal_quantile

    p = 0.5 + np.arange(1, 21) / 50
    order = np.random.default_rng(0).permutation(20)  # not handed over sorted
    logp = np.log(np.stack([p, 1 - p], axis=1))[order]
    labels = np.zeros(20, dtype=int)
    assert conformal_quantile(logp, labels, 0.1) == pytest.approx(0.88)
    assert conformal_quantile(logp, labels, 0.1, "raps") == pytest.approx(0.88)  # no penalty within k_reg = 2
    assert conformal_quantile(logp, labels, 0.5) == pytest.approx(0.5 + 11 / 50)  # k = ceil(10.5) = 11
    assert conformal_quantile(logp, labels, 0.04) == math.inf  # k = ceil(20.16) = 21 > n: every class
