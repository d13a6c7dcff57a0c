"""Every shipped evaluation config parses (keys, types, referenced files), without loading models."""

from pathlib import Path

import pytest

from cascadevlm.cascade.evaluate import EVAL_TRAINER_DEFAULTS, EvaluateCLI
from cascadevlm.clip.module import ClipClassifier
from cascadevlm.data.datamodule import CascadeDataModule

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "configs" / "experiments"
SETTINGS = sorted(EXPERIMENTS.glob("*_settings.yaml"))
CONFIGS = sorted(set(EXPERIMENTS.glob("*.yaml")) - set(SETTINGS)) + [REPO / "configs" / "demo.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_evaluation_config_parses(path, capsys):
    with pytest.raises(SystemExit) as done:
        EvaluateCLI(ClipClassifier, CascadeDataModule, run=False, trainer_defaults=EVAL_TRAINER_DEFAULTS,
                    save_config_callback=None, args=["--config", str(path), "--print_config"])  # fmt: skip
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model_name:" in printed and "cascade:" in printed


@pytest.mark.parametrize("path", SETTINGS, ids=lambda p: p.name)
def test_settings_config_parses_and_plans_every_setting(path, monkeypatch):
    from cascadevlm.cascade.settings import build_parser, plan

    monkeypatch.chdir(REPO)  # its paths are relative to the working directory
    cfg = build_parser().parse_args(["--config", str(path)])
    steps = plan(cfg)
    assert [(s["k"], s["seed"]) for s in steps][:2] == [(0, cfg.seeds[0]), (cfg.shots[1], cfg.seeds[0])]
    assert len(steps) == 1 + (len(cfg.shots) - 1) * len(cfg.seeds)
    assert Path(cfg.evaluate).exists() and Path(cfg.adapter).exists()
