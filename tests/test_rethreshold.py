"""python -m cascadevlm.rethreshold: another tau or gate from a run's records equals evaluate.py's run
of those settings (same name, records, metrics), without a model; and the records-only commands
(rethreshold, report.tables, data.prepare) import no Lightning."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from fake_cascade import fake_args

from cascadevlm.records import read_records
from cascadevlm.rethreshold import main as rethreshold_main
from cascadevlm.rethreshold import new_run_name, rethreshold

pytestmark = pytest.mark.usefixtures("clean_fake_lvlm")


@pytest.fixture(scope="module")
def runs(tiny_clip_path, data_root, tmp_path_factory):
    """evaluate.py runs of the fake LVLM on 40 images: tau 0.5 (the source), and the references."""
    from cascadevlm.cli import run_evaluate

    out = tmp_path_factory.mktemp("runs")

    def run(*extra):
        run_evaluate(fake_args(tiny_clip_path, data_root, out, None, *extra))
        return max(
            (d for d in out.iterdir() if (d / "metrics.json").exists()), key=lambda d: d.stat().st_mtime
        )

    return {
        "source": run("--cascade.tau", "0.5"),
        "tau1": run("--cascade.tau", "1"),
        "max_prob": run("--cascade.tau", "0.3", "--cascade.gate", "max_prob"),
    }


def _same_run(made, reference, source):
    assert made.name == reference.name
    a, b = read_records(made / "records.parquet"), read_records(reference / "records.parquet")
    assert [(r.deferred, r.final, r.lvlm_choice) for r in a] == [
        (r.deferred, r.final, r.lvlm_choice) for r in b
    ]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (made, reference))
    assert ma["methods"] == mb["methods"] and ma["metrics"] == mb["metrics"] and ma["gate"] == mb["gate"]
    assert ma["config"]["cascade"] == mb["config"]["cascade"]
    assert ma["params"]["lvlm_calls"] == 0 and ma["params"]["rethreshold_of"] == str(source)


@pytest.mark.parametrize(
    "ref, changes", [("tau1", {"tau": 1.0}), ("max_prob", {"tau": 0.3, "gate": "max_prob"})]
)
def test_rethreshold_equals_the_evaluate_run_of_those_settings(runs, tmp_path, ref, changes):
    made = rethreshold(runs["source"], changes, tmp_path)
    _same_run(made, runs[ref], runs["source"])
    assert (made / "plots" / "accuracy_vs_deferral.png").is_file() and (made / "sweep.csv").is_file()


def test_rethreshold_refusals(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        rethreshold_main([str(runs["source"]), "--budget", "0.1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {runs['source']} kept no records of its 'val' split, which a budget, calibration or conformal "
        "set is fitted on: give --tau, or rerun evaluate.py once with --cascade.budget (or --cascade.lvlm_on_val true)"
    )
    with pytest.raises(SystemExit):
        rethreshold_main([str(runs["source"])])
    assert capsys.readouterr().err.strip() == (
        "error: nothing to change: give --budget, --tau or a routing flag (--gate, --calibration, ...)"
    )


def test_new_run_names():
    old = {
        "tau": 0.5,
        "budget": None,
        "gate": "entropy",
        "calibration": "none",
        "candidates": "topk",
        "fusion": "none",
    }
    name = "fmnist_clip_w_test_k0_fake_score_lv1_tau0.5_all_top5_n40"
    assert new_run_name(name, old, {**old, "budget": 0.1, "budget_split": "val"}) == (
        "fmnist_clip_w_test_k0_fake_score_lv1_budget0.1-val_all_top5_n40"
    )
    gated = {**old, "gate": "margin", "candidates": "aps", "alpha": 0.2}
    assert (
        new_run_name(name, old, gated)
        == "fmnist_clip_w_test_k0_fake_score_lv1_tau0.5_all_top5_gmargin_aps0.2_n40"
    )
    assert new_run_name(new_run_name(name, old, gated), gated, old) == name
    assert new_run_name("mine", old, {**old, "tau": 1.0}) == "mine_rethreshold_tau1"


NO_LIGHTNING = textwrap.dedent(
    """
    import runpy, sys
    sys.argv = sys.argv[1:]
    try:
        runpy.run_module(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None), e.code
    print(sorted(m for m in ("lightning", "pytorch_lightning", "torch") if m in sys.modules))
    """
)


def _imported(*argv) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", NO_LIGHTNING, *argv], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_records_only_commands_import_no_lightning(runs, tmp_path):
    # rethreshold computes metrics with torchmetrics (torch), never Lightning
    assert "lightning" not in _imported(
        "cascadevlm.rethreshold", str(runs["source"]), "--tau", "2", "--out", str(tmp_path)
    )
    # the tables and prepare need neither
    assert _imported("cascadevlm.report.tables", str(runs["source"]), "--out", str(tmp_path / "t")) == []
    assert _imported("cascadevlm.data.prepare", "--help") == []
