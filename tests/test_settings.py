"""The k-shot settings sweep: one split per (k, seed) for adapter and LVLM examples, then the table."""

import json
from pathlib import Path

import pytest

from cascadevlm.cascade.settings import main
from cascadevlm.data.kshot import KShotSplit

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_settings_sweep_trains_evaluates_and_tabulates(tiny_clip_path, tiny_llava_dir, data_root, tmp_path, capsys):
    llava = tiny_llava_dir
    out = tmp_path / "settings"
    common = ["--model.pretrained", str(tiny_clip_path), "--data.data_root", str(data_root), "--data.limit", "40",
              "--lvlm.init_args.model", str(llava), "--lvlm.init_args.device", "cpu", "--cascade.lvlm_on", "deferred",
              "--cascade.budget", "0.5", "--cache_dir", str(tmp_path / "cache"), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    train = ["--model.init_args.pretrained", str(tiny_clip_path), "--data.init_args.data_root", str(data_root),
             "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]  # fmt: skip
    main([
        "--evaluate", str(REPO / "configs" / "demo.yaml"), "--adapter", json.dumps([str(REPO / "configs" / "method" / "linear_probe.yaml"), str(REPO / "configs" / "experiments" / "demo_linear_probe.yaml")]),
        "--shots", "[0, 2]", "--seeds", "[3]", "--out", str(out),
        "--evaluate_overrides", json.dumps(common), "--train_overrides", json.dumps(train),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert (
        "| fashion_mnist | 2-shot | clip (linear_probe) | 1 |" in printed
        and "| fashion_mnist | 0-shot | cascade | 1 |" in printed
    )

    # one split file for (k=2, seed=3), used by both the adapter's training and the evaluation
    assert sorted(p.name for p in (out / "splits").iterdir()) == ["fashion_mnist_k2_seed3.json"]
    split = KShotSplit.load(out / "splits" / "fashion_mnist_k2_seed3.json")
    assert all(len(rows) == 2 for rows in split.indices.values())
    k2 = json.loads((out / "eval" / "k2_s3" / "metrics.json").read_text())
    assert k2["params"]["shots"] == 2 and k2["params"]["incontext_shots"] == 1
    assert k2["params"]["adapter"].endswith("adapter.safetensors") and Path(k2["params"]["adapter"]).exists()
    k0 = json.loads((out / "eval" / "k0" / "metrics.json").read_text())
    assert k0["params"]["adapter"] is None
    # evaluate.py reports the adapter beside zero-shot CLIP on the same images
    assert k2["methods"]["clip_zero_shot"]["acc1"] == pytest.approx(k0["methods"]["clip"]["acc1"])
    assert (out / "results.csv").read_text().count(
        "fashion_mnist"
    ) == 5  # 2 settings x (clip, cascade) + zero-shot beside the adapter

    # a rerun of the same configuration finds the step done and only rebuilds the table
    main([
        "--evaluate", str(REPO / "configs" / "demo.yaml"), "--shots", "[0]", "--seeds", "[3]", "--out", str(out),
        "--evaluate_overrides", json.dumps(common),
    ])  # fmt: skip
    assert "k0: done before" in capsys.readouterr().out


def test_settings_runs_the_installed_entry_points_not_repository_scripts(tmp_path, capsys):
    import sys

    from cascadevlm.cascade.settings import build_parser, plan

    cfg = build_parser().parse_args(
        [
            "--evaluate",
            "e.yaml",
            "--adapter",
            "t.yaml",
            "--shots",
            "[0, 2]",
            "--seeds",
            "[1]",
            "--out",
            str(tmp_path),
        ]
    )
    steps = plan(cfg)
    cmds = [s["evaluate"] for s in steps] + [s["train"] for s in steps if s["train"]]
    assert len(cmds) == 3
    for cmd in cmds:
        assert cmd[:3] == [sys.executable, "-m", "cascadevlm.cli"]
        assert not any(a.endswith(("evaluate.py", "train.py")) for a in cmd), cmd
    assert steps[1]["train"][3:5] == ["train", "fit"] and steps[0]["evaluate"][3] == "evaluate"
    main(
        [
            "--evaluate",
            "e.yaml",
            "--shots",
            "[0]",
            "--seeds",
            "[1]",
            "--out",
            str(tmp_path),
            "--dry_run",
            "true",
        ]
    )
    assert capsys.readouterr().out.startswith("$ python -m cascadevlm.cli evaluate --config e.yaml")
