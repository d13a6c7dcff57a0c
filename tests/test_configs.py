"""Every shipped config parses (keys, types, referenced files), alone or composed the documented way
(configs by concern: data/, method/, lvlm/, trainer/, experiments/), without loading models."""

import contextlib
import io
from pathlib import Path

import lightning as L
import pytest
import yaml
from jsonargparse import ArgumentParser

from cascadevlm.cli import EVAL_TRAINER_DEFAULTS, EvaluateCLI, train_main
from cascadevlm.clip.adapters import KShotFeatureDataModule
from cascadevlm.clip.module import ClipClassifier
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.data.registry import benchmark_names

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
EXPERIMENTS = CONFIGS / "experiments"
DATA = sorted((CONFIGS / "data").glob("*.yaml"))
METHODS = sorted((CONFIGS / "method").glob("*.yaml"))
TRAINERS = sorted((CONFIGS / "trainer").glob("*.yaml"))
SETTINGS = sorted(EXPERIMENTS.glob("*_settings.yaml"))
# train.py experiments: what the demo changes, composed after a method file
TRAIN_EXPERIMENTS = {"demo_linear_probe.yaml": "linear_probe.yaml", "demo_coop.yaml": "coop.yaml"}
EVALUATION = [
    p for p in sorted(EXPERIMENTS.glob("*.yaml")) if p not in SETTINGS and p.name not in TRAIN_EXPERIMENTS
] + [CONFIGS / "demo.yaml"]


def _evaluate_print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as done:
        EvaluateCLI(ClipClassifier, CascadeDataModule, run=False, trainer_defaults=EVAL_TRAINER_DEFAULTS,
                    save_config_callback=None, args=[*args, "--print_config"])  # fmt: skip
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _train_print_config(args: list[str]) -> dict:
    out = io.StringIO()
    with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(out):
        train_main(["fit", *args, "--print_config"])
    assert done.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


def test_every_experiment_file_is_checked_here():
    assert {p.name for p in EXPERIMENTS.glob("*.yaml")} == (
        {p.name for p in SETTINGS} | set(TRAIN_EXPERIMENTS) | {p.name for p in EVALUATION[:-1]}
    )
    assert all((CONFIGS / "method" / m).exists() for m in TRAIN_EXPERIMENTS.values())


@pytest.mark.parametrize("path", EVALUATION, ids=lambda p: p.name)
def test_evaluation_config_parses(path, capsys):
    cfg = _evaluate_print_config(["--config", str(path)], capsys)
    assert cfg["model"]["model_name"] and "budget" in cfg["cascade"]


def test_a_data_config_for_each_benchmark_fits_both_data_modules():
    assert {p.stem for p in DATA} == set(benchmark_names())
    for cls in (CascadeDataModule, KShotFeatureDataModule):  # evaluate.py's and train.py's
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls)
        for path in DATA:
            cfg = parser.parse_path(str(path))
            assert cfg.dataset == ("fashion_mnist" if path.stem == "fashion_mnist" else f"data/{path.stem}")
            assert cfg.benchmark in (None, path.stem)


def test_trainer_presets_parse():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(L.Trainer)
    assert [parser.parse_path(str(p)).accelerator for p in TRAINERS] == ["cpu", "gpu", "gpu"]


def test_a_benchmark_experiment_composes_with_a_data_config(capsys):
    # --data after --config: the dataset's keys override, the experiment's data settings stay
    cfg = _evaluate_print_config(
        [
            "--config",
            str(EXPERIMENTS / "vitl14_qwen2vl.yaml"),
            "--data",
            str(CONFIGS / "data" / "cub200.yaml"),
        ],
        capsys,
    )
    assert cfg["data"]["dataset"] == "data/cub200" and cfg["data"]["benchmark"] == "cub200"
    assert cfg["data"]["batch_size"] == 128 and cfg["trainer"]["accelerator"] == "gpu"
    assert cfg["lvlm"]["class_path"].endswith("TransformersBackend")


@pytest.mark.parametrize("method", METHODS, ids=lambda p: p.stem)
def test_method_composes_with_a_data_config(method):
    own = yaml.safe_load(method.read_text())
    cfg = _train_print_config(
        ["--config", str(method), "--data", str(CONFIGS / "data" / "flowers102.yaml"), "--data.shots", "4"]
    )
    assert cfg["model"]["class_path"] == own["model"]["class_path"]
    assert {k: cfg["model"]["init_args"][k] for k in own["model"]["init_args"]} == own["model"]["init_args"]
    data = cfg["data"]["init_args"]
    assert cfg["data"]["class_path"] == own["data"]["class_path"]
    assert (data["dataset"], data["benchmark"], data["shots"]) == ("data/flowers102", "flowers102", 4)
    assert data["batch_size"] == own["data"]["init_args"]["batch_size"]  # the method's, kept


@pytest.mark.parametrize("name", sorted(TRAIN_EXPERIMENTS))
def test_demo_training_composes_on_its_method(name):
    method = CONFIGS / "method" / TRAIN_EXPERIMENTS[name]
    cfg = _train_print_config(["--config", str(method), "--config", str(EXPERIMENTS / name)])
    own, demo = yaml.safe_load(method.read_text()), yaml.safe_load((EXPERIMENTS / name).read_text())
    args = cfg["model"]["init_args"]
    # later files override earlier ones, key by key: the demo's keys win, the method's others stay
    assert {k: args[k] for k in demo["model"]["init_args"]} == demo["model"]["init_args"]
    kept = set(own["model"]["init_args"]) - set(demo["model"]["init_args"])
    assert kept and {k: args[k] for k in kept} == {k: own["model"]["init_args"][k] for k in kept}
    assert cfg["data"]["init_args"]["dataset"] == "fashion_mnist" and cfg["trainer"]["max_epochs"] == 30


@pytest.mark.parametrize("path", SETTINGS, ids=lambda p: p.name)
def test_settings_config_parses_and_plans_every_setting(path, monkeypatch):
    from cascadevlm.cascade.settings import build_parser, plan

    monkeypatch.chdir(REPO)  # its paths are relative to the working directory
    cfg = build_parser().parse_args(["--config", str(path)])
    steps = plan(cfg)
    assert [(s["k"], s["seed"]) for s in steps][:2] == [(0, cfg.seeds[0]), (cfg.shots[1], cfg.seeds[0])]
    assert len(steps) == 1 + (len(cfg.shots) - 1) * len(cfg.seeds)
    adapters = [cfg.adapter] if isinstance(cfg.adapter, str) else cfg.adapter
    assert Path(cfg.evaluate).exists() and adapters and all(Path(a).exists() for a in adapters)
    train = steps[1]["train"]
    assert [train[i + 1] for i, a in enumerate(train) if a == "--config"] == adapters  # composed in order
