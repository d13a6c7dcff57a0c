"""The cascade end to end: gate extremes, budget, sweep-from-records vs a real run, DDP, resume."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cascadevlm.cli import run_evaluate as main
from cascadevlm.gating.gate import defer_mask, tau_for_budget, tau_grid
from cascadevlm.lvlm.transformers_backend import TransformersBackend
from cascadevlm.records import read_records
from cascadevlm.report.analysis import final_at_tau, sweep
from cascadevlm.report.metrics import accuracy

REPO = Path(__file__).resolve().parents[1]


def test_tau_for_budget_never_exceeds_it():
    rng = np.random.default_rng(0)
    e = np.concatenate([rng.random(200), np.full(30, 0.5)])  # ties included
    for budget in (0.0, 0.05, 0.2, 0.5, 0.99, 1.0):
        tau = tau_for_budget(e, budget)
        assert defer_mask(e, tau).mean() <= budget + 1e-12
    assert tau_for_budget(e, 1.0) == -math.inf
    assert defer_mask(e, -math.inf).all() and not defer_mask(e, math.inf).any()
    assert defer_mask(np.arange(10), tau_for_budget(np.arange(10), 0.3)).sum() == 3
    with pytest.raises(ValueError, match="budget must be a fraction in \\[0, 1\\], got 1.5"):
        tau_for_budget(e, 1.5)
    grid = tau_grid(e, 100)
    assert grid[0] == math.inf and grid[-1] == -math.inf and len(grid) <= 100


@pytest.fixture(scope="module")
def llava_dir(tiny_llava_dir):
    return tiny_llava_dir


def _args(tiny_clip_path, data_root, llava_dir, out, name, *extra):
    return [
        "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
        "--data.dataset", "fashion_mnist", "--data.data_root", str(data_root),
        "--data.limit", "60", "--data.batch_size", "32",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--lvlm.class_path", "cascadevlm.lvlm.transformers_backend.TransformersBackend",
        "--lvlm.init_args.model", str(llava_dir), "--lvlm.init_args.device", "cpu",
        "--lvlm.init_args.batch_size", "8", "--cascade.lvlm_batch_size", "8",
        "--output_dir", str(out), "--cache_dir", str(out / "cache"), "--run_name", name,
        # these tests count what each run asks the LVLM; the answer store (tests/test_answer_store.py)
        # would serve a later run from an earlier one's answers
        "--answer_store", "null",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def count_calls(monkeypatch):
    """Counts the images that reach the LVLM; ``crash_after`` makes the n-th batch raise (a killed run)."""
    state = {"images": 0, "indices": [], "crash_after": None, "batches": 0}
    real = TransformersBackend.choose

    def choose(self, requests):
        state["batches"] += 1
        if state["crash_after"] is not None and state["batches"] > state["crash_after"]:
            raise RuntimeError("simulated crash")
        state["images"] += len(requests)
        return real(self, requests)

    monkeypatch.setattr(TransformersBackend, "choose", choose)
    return state


@pytest.mark.slow
def test_gate_extremes_budget_and_sweep_from_records(
    tiny_clip_path, data_root, llava_dir, tmp_path, count_calls
):
    # CLIP only: no LVLM stage at all
    clip_only = main(_args(tiny_clip_path, data_root, llava_dir, tmp_path, "clip", "--lvlm", "null"))
    clip_recs = read_records(tmp_path / "clip" / "records.parquet")
    assert count_calls["images"] == 0 and clip_only["methods"].keys() == {"clip"}

    # tau = +inf with the LVLM answering only deferred images: records equal the CLIP-only run
    main(
        _args(
            tiny_clip_path,
            data_root,
            llava_dir,
            tmp_path,
            "inf",
            "--cascade.tau",
            ".inf",
            "--cascade.lvlm_on",
            "deferred",
        )
    )
    assert count_calls["images"] == 0
    assert read_records(tmp_path / "inf" / "records.parquet") == clip_recs

    # tau = -inf: every image deferred, final = LVLM choice
    all_run = main(_args(tiny_clip_path, data_root, llava_dir, tmp_path, "all", "--cascade.tau=-.inf"))
    recs = read_records(tmp_path / "all" / "records.parquet")
    assert count_calls["images"] == 60
    assert all(r.deferred and r.final == r.lvlm_choice for r in recs)
    assert all(r.lvlm_choice in r.clip_topk[:5] for r in recs)
    assert all_run["methods"]["lvlm_all"]["acc1"] == pytest.approx(all_run["metrics"]["acc1"])

    # the sweep computed from those records at some tau equals a real run at that tau
    tau = float(np.median([r.entropy for r in recs]))
    predicted = next(row for row in sweep(recs, 10, [tau]))
    real = main(_args(tiny_clip_path, data_root, llava_dir, tmp_path, "mid", "--cascade.tau", str(tau),
                      "--cascade.lvlm_on", "deferred"))  # fmt: skip
    mid = read_records(tmp_path / "mid" / "records.parquet")
    assert [r.final for r in mid] == final_at_tau(recs, tau)
    assert real["metrics"]["acc1"] == pytest.approx(predicted["acc1"])
    assert real["methods"]["cascade"]["deferral"] == pytest.approx(predicted["deferral"])
    assert real["params"]["lvlm_calls"] == predicted["deferred"] == sum(r.deferred for r in mid)
    assert (tmp_path / "mid" / "plots" / "accuracy_vs_deferral.png").stat().st_size > 1000

    # a budget: tau chosen on the val split defers no more than the budget there
    count_calls["images"] = 0
    b = main(_args(tiny_clip_path, data_root, llava_dir, tmp_path, "budget", "--cascade.budget", "0.2",
                   "--cascade.lvlm_on", "deferred"))  # fmt: skip
    assert b["gate"]["source"] == "budget 0.2 on val"
    assert b["gate"]["budget_split_deferral"] <= 0.2
    val = read_records(tmp_path / "budget" / "parts" / "budget" / "clip.rank0.jsonl")
    assert len(val) == 5000
    assert defer_mask([r.entropy for r in val], b["gate"]["tau"]).mean() <= 0.2
    assert (
        count_calls["images"]
        == b["params"]["lvlm_calls"]
        == sum(r.deferred for r in read_records(tmp_path / "budget" / "records.parquet"))
    )


@pytest.mark.slow
def test_resume_after_a_crash_equals_an_uninterrupted_run(
    tiny_clip_path, data_root, llava_dir, tmp_path, count_calls
):
    args = ("--cascade.tau", "0.01", "--cascade.lvlm_on", "all")
    main(_args(tiny_clip_path, data_root, llava_dir, tmp_path, "whole", *args))
    whole = read_records(tmp_path / "whole" / "records.parquet")
    assert count_calls["images"] == 60

    count_calls.update(images=0, batches=0, crash_after=3)  # dies during the 4th batch of 8
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_args(tiny_clip_path, data_root, llava_dir, tmp_path, "resumed", *args))
    assert count_calls["images"] == 24
    assert not (tmp_path / "resumed" / "records.parquet").exists()

    count_calls.update(images=0, batches=0, crash_after=None)
    again = main(_args(tiny_clip_path, data_root, llava_dir, tmp_path, "resumed", *args))
    assert count_calls["images"] == 60 - 24  # finished images never reach the LVLM twice
    assert again["params"]["lvlm_calls_this_attempt"] == 36
    assert again["params"]["lvlm_calls"] == 24 + 36  # the crashed attempt's calls count too
    assert read_records(tmp_path / "resumed" / "records.parquet") == whole

    # a different LVLM configuration cannot silently reuse those answers
    with pytest.raises(ValueError, match="holds LVLM answers from another LVLM configuration"):
        main(_args(tiny_clip_path, data_root, llava_dir, tmp_path, "resumed", *args, "--cascade.topk", "3"))


@pytest.mark.slow
def test_two_ddp_processes_give_the_same_cascade_records(tiny_clip_path, data_root, llava_dir, tmp_path):
    def run(name, *extra):
        a = _args(tiny_clip_path, data_root, llava_dir, tmp_path, name, "--data.limit", "37",
                  "--cascade.tau", "0.01", "--cascade.lvlm_on", "deferred", *extra)  # fmt: skip
        p = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *a], cwd=REPO, capture_output=True,
                           text=True, timeout=400, env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        return read_records(tmp_path / name / "records.parquet"), json.loads(
            (tmp_path / name / "metrics.json").read_text()
        )

    one, m1 = run("one")
    two, m2 = run("two", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert [r.index for r in two] == list(range(37))
    assert m2["params"]["devices"] == 2
    deferred = [r.index for r in one if r.deferred]
    assert 0 < len(deferred) < 37
    for a, b in zip(one, two, strict=True):
        assert (a.index, a.clip_topk, a.deferred, a.lvlm_choice, a.final) == (
            b.index,
            b.clip_topk,
            b.deferred,
            b.lvlm_choice,
            b.final,
        )
    # every deferred image was answered exactly once across both ranks (the sampler's padding is dropped)
    lines = []
    for part in (tmp_path / "two" / "parts").glob("lvlm.rank*.jsonl"):
        lines += [json.loads(x)["index"] for x in part.read_text().splitlines()]
    assert sorted(set(lines)) == deferred
    assert m1["metrics"]["acc1"] == pytest.approx(m2["metrics"]["acc1"])
    assert accuracy([r.final for r in two], [r.label for r in two], 10) == pytest.approx(
        m2["metrics"]["acc1"]
    )
