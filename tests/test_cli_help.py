"""Discoverable command lines: short class names and ``--help`` name the project's classes, the documented
forms work, one flag style (``--a_b``) on every entry point, and ``train.py test`` on an adapter."""

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cascadevlm.cli import evaluate_main, train_main

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _run(entry, args: list[str]) -> str:
    """Run an entry point in-process; the stdout of a ``--help`` / ``--print_config`` (exit 0)."""
    out = io.StringIO()
    with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(out):
        entry(args)
    assert done.value.code in (0, None), out.getvalue()[-2000:]
    return out.getvalue()


def test_short_class_names_resolve_to_the_projects_classes():
    cfg = yaml.safe_load(_run(train_main, ["fit", "--model", "PromptTuningModule", "--print_config"]))
    assert cfg["model"]["class_path"] == "cascadevlm.clip.adapters.PromptTuningModule"
    cfg = yaml.safe_load(_run(train_main, ["fit", "--model", "LinearProbeModule", "--print_config"]))
    assert cfg["model"]["class_path"] == "cascadevlm.clip.adapters.LinearProbeModule"
    cfg = yaml.safe_load(_run(evaluate_main, ["--lvlm", "TransformersBackend", "--print_config"]))
    assert cfg["lvlm"]["class_path"] == "cascadevlm.lvlm.transformers_backend.TransformersBackend"


def test_class_help_by_short_name():
    printed = _run(train_main, ["fit", "--model.help", "PromptTuningModule"])
    assert "Help for --model.help=cascadevlm.clip.adapters.PromptTuningModule" in printed
    assert "--model.ctx_init" in printed and "--model.class_specific" in printed
    printed = _run(evaluate_main, ["--lvlm.help", "TransformersBackend"])
    assert "--lvlm.mode" in printed and "--lvlm.model" in printed


def test_help_names_the_projects_classes():
    printed = re.sub(r"\s+", "", _run(train_main, ["fit", "--help"]))  # argparse wraps long names
    for name in ("cascadevlm.clip.adapters.LinearProbeModule", "cascadevlm.clip.adapters.PromptTuningModule",
                 "cascadevlm.clip.adapters.KShotFeatureDataModule", "cascadevlm.lvlm.lora.LoRAModule",
                 "cascadevlm.lvlm.lora.LoRADataModule"):  # fmt: skip
        assert name in printed, name
    printed = re.sub(r"\s+", "", _run(evaluate_main, ["--help"]))
    assert "cascadevlm.lvlm.transformers_backend.TransformersBackend" in printed
    assert "cascadevlm.lvlm.api_backend.OpenAIBackend" in printed


def test_help_shows_the_projects_options_and_help_all_adds_lightnings_after_them():
    short = _run(evaluate_main, ["--help"])
    assert short.startswith("usage: ") and "\n\n" in short[:120]  # a one-line usage, not 80 lines of flags
    assert "--cascade.budget" in short and "--model.pretrained" in short and "--lvlm.help" in short
    assert "--trainer.max_epochs" not in short and "--trainer.accelerator" not in short  # named in the last line
    assert "--optimizer" not in short
    assert re.search(r"Lightning's Trainer options \(--trainer\.\*, \d+ more\): --help_all\n$", short)
    full = _run(evaluate_main, ["--help_all"])
    assert full.index("--cascade.budget") < full.index("--trainer.max_epochs")
    fit = _run(train_main, ["fit", "--help"])
    assert "--model CONFIG" in fit and "--trainer.max_epochs" not in fit and "--help_all" in fit
    assert "--trainer.max_epochs" in _run(train_main, ["fit", "--help_all"])


def _documented_class_help() -> list[tuple[str, list[str]]]:
    """``python train.py|evaluate.py ... --<key>.help <Class>`` commands in the README and docs/."""
    pattern = re.compile(r"python (train|evaluate)\.py ((?:fit |test )?)[^`\n]*?(--\w+\.help \w+)")
    found = set()
    for path in DOCS:
        for entry, sub, flag in pattern.findall(path.read_text()):
            found.add((entry, tuple(sub.split() + flag.split())))
    return [(entry, list(args)) for entry, args in sorted(found)]


def test_the_documented_class_help_commands_work():
    commands = _documented_class_help()
    assert ("train", ["fit", "--model.help", "PromptTuningModule"]) in commands
    for entry, args in commands:
        printed = _run(train_main if entry == "train" else evaluate_main, args)
        assert f"Help for {args[-2]}=cascadevlm." in printed, (entry, args)


def test_one_flag_style_on_every_entry_point():
    from cascadevlm.cascade.settings import build_parser as settings_parser
    from cascadevlm.data.prepare import build_parser as prepare_parser
    from cascadevlm.flags import underscored

    prepare = prepare_parser()
    # LightningCLI's style (--skip_bad) everywhere; the older dashed spelling still parses the same
    assert vars(prepare.parse_args(["cub200", "--skip_bad", "--val_fraction", "0.1"])) == vars(
        prepare.parse_args(["cub200", "--skip-bad", "--val-fraction", "0.1"])
    )
    assert "--skip_bad" in prepare.format_usage() and "--skip-bad" not in prepare.format_usage()
    options = prepare._option_string_actions
    dashed = [o for o in options if o.startswith("--") and "-" in o[2:]]
    assert "--allow-overlap" in dashed and all(options[underscored(o)] is options[o] for o in dashed)
    settings = settings_parser()
    assert all("-" not in o[2:] for a in settings._actions for o in a.option_strings if o.startswith("--"))


@pytest.mark.slow  # a real fit then test through LightningCLI (about 20 s on 2 cores)
def test_train_test_subcommand_tests_a_trained_adapter(tiny_clip_path, data_root, tmp_path):
    from cascadevlm.clip.adapters import KShotFeatureDataModule, load_adapter
    from cascadevlm.clip.model import load_clip

    data = {"--data.data_root": str(data_root), "--data.cache_dir": str(tmp_path / "features"),
            "--data.splits_dir": str(tmp_path / "splits"), "--data.shots": "1", "--data.val_limit": "30",
            "--data.test_limit": "40"}  # fmt: skip
    common = [
        "--config", str(REPO / "configs" / "method" / "linear_probe.yaml"),
        "--config", str(REPO / "configs" / "experiments" / "demo_linear_probe.yaml"),
        "--model.pretrained", str(tiny_clip_path), *[x for kv in data.items() for x in kv],
        "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    train_main(["fit", *common, "--trainer.max_epochs", "2"])
    run = tmp_path / "runs" / "fashion_mnist_cascadevlm-tiny-vit_cascadevlm-tiny-vit-seed0_linear_probe" / "k1_seed1"
    after_fit = json.loads((run / "metrics.json").read_text())

    # The reference: the exported adapter file applied to the test features by hand.
    bundle = load_clip("cascadevlm-tiny-vit", str(tiny_clip_path))
    dm = KShotFeatureDataModule(
        "fashion_mnist", shots=1, val_limit=30, test_limit=40, data_root=str(data_root),
        cache_dir=str(tmp_path / "features"), splits_dir=str(tmp_path / "splits"),
    )  # fmt: skip
    dm.attach_bundle(bundle)
    dm.setup("test")
    head = load_adapter(run / "adapter.safetensors", bundle=bundle, class_names=dm.class_names)
    with torch.no_grad():
        pred = head(dm.features["test"]).argmax(-1)
    reference = float((pred == torch.tensor(dm.targets["test"])).float().mean())
    assert after_fit["test_acc"] == pytest.approx(reference) and after_fit["test_size"] == 40

    # train.py test on the run's checkpoint: the same number from the module's test_step, the run kept
    (run / "metrics.json").unlink()
    cli = train_main(["test", *common, "--ckpt_path", str(run / "checkpoints" / "best.ckpt")])
    assert float(cli.trainer.callback_metrics["test/acc"]) == pytest.approx(reference)
    tested = json.loads((run / "metrics.json").read_text())
    assert tested["test_acc"] == pytest.approx(reference) and tested["test_size"] == 40
    assert (run / "adapter.safetensors").exists() and (run / "checkpoints" / "best.ckpt").exists()


def test_an_entry_given_args_within_another_command_line_does_not_warn(monkeypatch, recwarn):
    """The adapter sweep calls train.py's entry in-process with args=: LightningCLI warned (about 1,000
    characters, once per run) that it also saw a command line; evaluate_main likewise."""
    monkeypatch.setattr(sys, "argv", ["sweep.py", "--methods", "linear_probe"])
    _run(train_main, ["fit", "--model", "LinearProbeModule", "--print_config"])
    _run(evaluate_main, ["--print_config"])
    assert not [w for w in recwarn if "args parameter is intended" in str(w.message)]
