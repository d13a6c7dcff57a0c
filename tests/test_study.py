"""The study runner: a grid of runs in one process, checked up front, resumable after kill -9."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cascadevlm.cli import split_datasets
from cascadevlm.study import load_study, main, plan

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study))
    return path


def _refused(tmp_path, capsys, study: dict) -> str:
    """The one line ``main`` refuses ``study`` with (exit 2), checking that no cell ran."""
    with pytest.raises(SystemExit) as exc:
        main([str(_write(tmp_path / "study.yaml", study))])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not (tmp_path / "out").exists()  # refused before any cell ran
    return err


def _study(tmp_path, **changes) -> dict:
    evaluate = tmp_path / "e.yaml"
    evaluate.write_text("cascade: {tau: 0.5}\n")
    return {
        "evaluate": str(evaluate),
        "out": str(tmp_path / "out"),
        "grid": {"shots": [0, 1], "seeds": [1]},
        **changes,
    }


def test_unknown_keys_are_refused_in_one_line(tmp_path, capsys):
    err = _refused(tmp_path, capsys, _study(tmp_path, seed=[1, 2]))
    assert "unknown key 'seed'; known: name, evaluate, out, grid" in err
    err = _refused(tmp_path, capsys, _study(tmp_path, grid={"shots": [0], "budget": [0.1]}))
    assert "unknown key 'grid.budget'; known axes: datasets, clip, methods, shots, seeds, budgets" in err


@pytest.mark.parametrize(
    "grid, says",
    [
        (None, "empty grid: "),
        ({}, "empty grid: "),
        ({"shots": [0], "seeds": []}, "empty grid: grid.seeds is []"),
        ({"shots": [0, 2], "methods": {}}, "empty grid: grid.methods must map a method name"),
    ],
)
def test_an_empty_grid_is_refused_in_one_line(tmp_path, capsys, grid, says):
    assert says in _refused(tmp_path, capsys, _study(tmp_path, grid=grid))


def test_bad_axis_values_are_refused_in_one_line(tmp_path, capsys):
    assert "grid.budgets: a budget is a fraction of images in (0, 1], got [0.1, 3]" in _refused(
        tmp_path, capsys, _study(tmp_path, grid={"budgets": [0.1, 3]})
    )
    assert "grid.lvlms: no file nowhere.yaml" in _refused(
        tmp_path, capsys, _study(tmp_path, grid={"lvlms": ["nowhere.yaml"]})
    )


def test_a_cell_that_cannot_run_is_refused_before_any_cell_runs(tmp_path, capsys):
    # the second gate is no gate: the first cell would run fine, but nothing runs
    err = _refused(tmp_path, capsys, _study(tmp_path, grid={"gates": ["entropy", "entropyy"]}))
    assert err.startswith("error: cell gentropyy_k0 cannot run: ") and "cascade.gate" in err


def test_the_grid_names_cells_by_the_axes_it_varies(tmp_path):
    method = tmp_path / "m.yaml"
    method.write_text("{}\n")
    study = load_study(
        _write(
            tmp_path / "s.yaml",
            _study(
                tmp_path,
                grid={
                    "datasets": ["a", "b"],
                    "methods": {"lp": str(method)},
                    "shots": [0, 2],
                    "seeds": [1, 2],
                    "budgets": [0.1, 0.3],
                },
            ),  # fmt: skip
        )
    )
    cells = plan(study)
    names = [c["name"] for c in cells]
    # zero-shot once per (dataset, budget); k > 0 per seed; the adapter is shared across budgets
    assert names[:6] == ["a_b0.1_k0", "a_lp_b0.1_k2_s1", "a_lp_b0.1_k2_s2", "a_b0.3_k0", "a_lp_b0.3_k2_s1",
                         "a_lp_b0.3_k2_s2"]  # fmt: skip
    assert len(cells) == 12 and len(set(names)) == 12
    roots = {c["name"]: c["adapter_root"] for c in cells}
    assert roots["a_lp_b0.1_k2_s1"] == roots["a_lp_b0.3_k2_s1"] == tmp_path / "out" / "train" / "a_lp_k2_s1"
    assert roots["a_b0.1_k0"] is None
    ev = cells[1]["evaluate"]
    assert ev[ev.index("--data.dataset") + 1] == "a" and ev[ev.index("--cascade.budget") + 1] == "0.1"


def test_evaluate_takes_several_datasets_as_one_list():
    args = ["--config", "c.yaml", "--data.dataset", "a,b", "--data.limit", "5"]
    assert split_datasets(args) == [
        ["--config", "c.yaml", "--data.dataset=a", "--data.limit", "5"],
        ["--config", "c.yaml", "--data.dataset=b", "--data.limit", "5"],
    ]
    assert split_datasets(["--data.dataset=a, b"]) == [["--data.dataset=a"], ["--data.dataset=b"]]
    assert split_datasets(["--data.dataset", "a"]) == [["--data.dataset", "a"]]
    with pytest.raises(ValueError, match="--run_name names one run"):
        split_datasets(["--data.dataset", "a,b", "--run_name", "r"])


def _tiny_study(tmp_path, tiny_clip_path, tiny_llava_dir, data_root, out: Path) -> Path:
    evaluate = {
        "model": {"model_name": "cascadevlm-tiny-vit", "pretrained": str(tiny_clip_path)},
        "data": {"dataset": "fashion_mnist", "data_root": str(data_root), "limit": 16, "batch_size": 32},
        "cascade": {"tau": 0.5, "lvlm_on": "deferred"},
        "lvlm": {
            "class_path": "cascadevlm.lvlm.transformers_backend.TransformersBackend",
            "init_args": {"model": str(tiny_llava_dir), "device": "cpu"},
        },  # fmt: skip
        "trainer": {"accelerator": "cpu"},
        "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(evaluate))
    study = {"evaluate": str(tmp_path / "e.yaml"), "out": str(out), "incontext_shots": 0,
             "grid": {"shots": [0, 1], "seeds": [1]}}  # fmt: skip
    return _write(out.parent / f"{out.name}.yaml", study)


def _rows(out: Path) -> list[dict]:
    """The study's table without the run directories (they name the study's folder)."""
    return [
        {k: v for k, v in row.items() if k != "runs"}
        for row in json.loads((out / "results.json").read_text())
    ]


# The study as ``python -m cascadevlm.study``, killed (SIGKILL, as kill -9) by itself right after its first
# cell: where the kill lands does not depend on how soon a poll from the test sees that cell's output (a
# late poll on a busy machine let the second cell finish too).
KILLED_AFTER_FIRST_CELL = """
import os, signal, sys
import cascadevlm.study as study
run_cell = study._run_cell
def run_then_die(*args, **kwargs):
    run_cell(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
study._run_cell = run_then_die
study.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_study_killed_after_its_first_cell_skips_finished_cells_and_gives_the_same_table(
    tmp_path, tiny_clip_path, tiny_llava_dir, data_root, capsys
):
    killed = tmp_path / "killed"
    study = _tiny_study(tmp_path, tiny_clip_path, tiny_llava_dir, data_root, killed)
    first = killed / "eval" / "k0" / "metrics.json"
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_FIRST_CELL, str(study)], cwd=REPO, timeout=600,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL
    assert first.exists() and not (killed / "results.json").exists()
    finished = sorted(p.parent.name for p in (killed / "eval").glob("*/metrics.json"))

    main([str(study)])
    printed = capsys.readouterr().out
    assert finished == ["k0"]  # the kill came before the last cell
    for name in ["k0", "k1_s1"]:
        assert (f"{name}: done before" in printed) == (name in finished), name

    # an uninterrupted study of the same grid (features and answers from the shared cache) gives the same table
    whole = _tiny_study(tmp_path, tiny_clip_path, tiny_llava_dir, data_root, tmp_path / "whole")
    main([str(whole)])
    assert _rows(killed) == _rows(tmp_path / "whole") and len(_rows(killed)) == 4  # 2 cells x (clip, cascade)

    # a cell whose configuration changed is not finished: it runs again
    changed = yaml.safe_load(study.read_text())
    changed["evaluate_overrides"] = ["--cascade.topk", "3"]
    main([str(_write(study, changed))])
    assert "done before" not in capsys.readouterr().out


def test_evaluate_runs_each_of_several_datasets_in_one_call(tiny_clip_path, data_root, photo_folder, tmp_path):
    from cascadevlm.cli import evaluate_main

    runs = evaluate_main([
        "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
        "--data.dataset", f"fashion_mnist,{photo_folder}", "--data.data_root", str(data_root), "--data.limit", "6",
        "--data.batch_size", "8", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--output_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"),
    ])  # fmt: skip
    assert [r["config"]["data"]["dataset"] for r in runs] == ["fashion_mnist", str(photo_folder)]
    assert [r["params"]["images"] for r in runs] == [6, 6]
    dirs = sorted(p.parent.name for p in (tmp_path / "runs").glob("*/metrics.json"))
    assert len(dirs) == 2 and dirs[0].startswith("fashion_mnist") != dirs[1].startswith("fashion_mnist")


def test_two_studies_over_one_folder_run_a_cell_once(tmp_path, monkeypatch, capsys):
    # Two studies writing one out folder at once (two shells, two jobs): the other study is running the
    # first cell when this one reaches it. Both looked at its metrics.json, found none and ran the cell
    # into one run directory together. Replayed in one process: the first cell's claim is held as the
    # other study's process holds it; while this study waits, the other finishes the cell and lets go.
    import fcntl

    import cascadevlm.study as study_mod

    study = load_study(_write(tmp_path / "s.yaml", _study(tmp_path, grid={"shots": [0], "budgets": [0.1, 0.3]})))
    cells = plan(study)
    ran: list[str] = []

    def evaluate(cmd, log):  # an evaluate.py step: its run directory gets its metrics.json
        name = cmd[cmd.index("--run_name") + 1]
        ran.append(name)
        (study.out / "eval" / name).mkdir(parents=True)
        (study.out / "eval" / name / "metrics.json").write_text("{}")

    lock = study.out / ".claims" / f"eval_{cells[0]['name']}.lock"
    lock.parent.mkdir(parents=True)
    other = lock.open("a")
    fcntl.flock(other, fcntl.LOCK_EX)  # the other study is running the first cell
    real_wait = getattr(study_mod, "_wait_for_claim", None)

    def the_other_study_finishes_the_cell(fh, what):
        evaluate(["--run_name", cells[0]["name"]], None)
        ran[-1] = "the other study: " + ran[-1]
        other.close()  # its step ended: the claim is let go
        real_wait(fh, what)

    monkeypatch.setattr(study_mod, "run_subprocess", evaluate)
    monkeypatch.setattr(study_mod, "_wait_for_claim", the_other_study_finishes_the_cell, raising=False)
    study_mod.run_cells(cells, study.out, "per_step")
    printed = capsys.readouterr().out
    assert ran == ["the other study: b0.1_k0", "b0.3_k0"]  # the first cell ran once, by the other study
    assert "eval_b0.1_k0: another study is running it; waiting for it" in printed
    assert f"b0.1_k0: done before ({study.out / 'eval' / 'b0.1_k0'})" in printed
