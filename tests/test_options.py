"""Cascade options: refused before any stage in one line, honoured when accepted (topk, tau, sweep)."""

from __future__ import annotations

import csv
import math

import pytest
from fake_cascade import fake_args

from cascadevlm.cascade.evaluate import join_negative_values, parse_threshold
from cascadevlm.cli import run_evaluate as main
from cascadevlm.gating.gate import tau_grid
from cascadevlm.records import read_records
from cascadevlm.testing.fake_lvlm import FakeLVLM

pytestmark = pytest.mark.usefixtures("clean_fake_lvlm")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cascade.budget", "1.5"], "cascade.budget must be a fraction in [0, 1], got 1.5"),
        (["--cascade.topk", "0"], "cascade.topk must be between 1 and the number of classes (10), got 0"),
        (["--cascade.topk", "11"], "cascade.topk must be between 1 and the number of classes (10), got 11"),
        (["--cascade.tau", "nan"], "cascade.tau is NaN: give a number, inf (CLIP only) or -inf (the LVLM on every image)"),
        (["--cascade.sweep_points", "1"], "cascade.sweep_points must be >= 2, got 1"),
        (["--cascade.lvlm_batch_size", "0"], "cascade.lvlm_batch_size must be >= 1, got 0"),
        (["--cascade.max_examples", "-1"], "cascade.max_examples must be >= 0, got -1"),
        (["--cascade.incontext_shots", "1"], "cascade.incontext_shots needs a k-shot split: set data.shots >= 1"),
        (
            ["--cascade.budget", "0.2", "--cascade.budget_split", "dev"],
            "dataset 'fashion_mnist' has no split 'dev' to choose tau on (cascade.budget_split); it has "
            "['train', 'val', 'test']: set --cascade.budget_split, or give tau: --cascade.budget null --cascade.tau X",
        ),
    ],
)  # fmt: skip
def test_bad_options_are_refused_before_any_stage(tiny_clip_path, data_root, tmp_path, extra, message):
    with pytest.raises(ValueError) as err:
        main(fake_args(tiny_clip_path, data_root, tmp_path, "r", *extra))
    assert str(err.value) == message
    assert not (tmp_path / "r").exists()  # no stage ran: nothing written
    assert FakeLVLM.log == []


def test_cascade_topk_above_model_topk_shows_the_lvlm_that_many(tiny_clip_path, data_root, tmp_path):
    out = main(fake_args(tiny_clip_path, data_root, tmp_path, "r", "--model.topk", "5", "--cascade.topk", "7",
                         "--cascade.tau=-inf", limit=20))  # fmt: skip
    assert len(FakeLVLM.log) == 20
    assert {len(r.candidates) for r in FakeLVLM.log} == {7}
    recs = read_records(tmp_path / "r" / "records.parquet")
    assert all(len(r.clip_topk) >= 7 and r.lvlm_choice in r.clip_topk[:7] for r in recs)
    assert out["params"]["topk"] == 7


def test_tau_infinities_parse_on_the_command_line(tiny_clip_path, data_root, tmp_path):
    assert join_negative_values(["--cascade.tau", "-inf", "--x", "-1"]) == ["--cascade.tau=-inf", "--x", "-1"]
    for text, value in [("inf", math.inf), ("+inf", math.inf), ("-inf", -math.inf), (".inf", math.inf),
                        ("-.inf", -math.inf), ("Infinity", math.inf), ("0.25", 0.25)]:  # fmt: skip
        assert parse_threshold(text) == value
    with pytest.raises(ValueError, match="expected a number, inf or -inf, got 'abc'"):
        parse_threshold("abc")
    # the README's spelling, space-separated, through the real parser
    out = main(fake_args(tiny_clip_path, data_root, tmp_path, "minus", "--cascade.tau", "-inf", limit=12))
    assert out["gate"]["tau"] == "-inf" or out["gate"]["tau"] == -math.inf
    assert len(FakeLVLM.log) == 12
    FakeLVLM.log.clear()
    out = main(fake_args(tiny_clip_path, data_root, tmp_path, "plus", "--cascade.tau", "+inf",
                         "--cascade.lvlm_on", "deferred", limit=12))  # fmt: skip
    assert out["methods"]["cascade"]["deferral"] == 0.0 and FakeLVLM.log == []


def test_sweep_points_sets_the_sweep(tiny_clip_path, data_root, tmp_path):
    main(fake_args(tiny_clip_path, data_root, tmp_path, "r", "--cascade.sweep_points", "6", limit=30))
    with (tmp_path / "r" / "sweep.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    recs = read_records(tmp_path / "r" / "records.parquet")
    expected = tau_grid([r.entropy for r in recs], 6)
    assert [float(r["tau"]) for r in rows] == pytest.approx(expected)
    assert len(rows) <= 6
