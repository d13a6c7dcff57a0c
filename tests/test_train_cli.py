"""train.py end to end: run directory, best checkpoint + adapter + config, TensorBoard scalars, DDP on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cascadevlm.cli import clear_run_dir
from cascadevlm.clip.adapters import adapter_metadata, load_adapter
from cascadevlm.clip.model import load_clip
from cascadevlm.data.registry import FASHION_MNIST

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _train(
    config: str, data_root: Path, tmp: Path, pretrained: Path, *extra: str
) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "train.py", "fit", "--config", f"configs/method/{config}",
        "--config", f"configs/experiments/demo_{config}",  # the demo composed on the method
        "--model.init_args.pretrained", str(pretrained),
        "--data.init_args.data_root", str(data_root),
        "--data.init_args.cache_dir", str(tmp / "features"),
        "--data.init_args.splits_dir", str(tmp / "splits"),
        "--data.init_args.shots", "2",
        "--data.init_args.val_limit", "100",
        "--data.init_args.test_limit", "100",
        "--trainer.default_root_dir", str(tmp / "runs"),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_train_writes_best_checkpoint_adapter_config_and_tensorboard_curves(data_root, tiny_clip_path, tmp_path):
    tiny = tiny_clip_path
    _train("linear_probe.yaml", data_root, tmp_path, tiny, "--trainer.max_epochs", "4")
    run = tmp_path / "runs" / "fashion_mnist_linear_probe" / "k2_seed1"
    assert [p.relative_to(run).as_posix() for p in run.rglob("*.ckpt")] == ["checkpoints/best.ckpt"]

    # The adapter is the best checkpoint's head, and it carries the config that made it.
    bundle = load_clip("cascadevlm-tiny-vit", str(tiny))
    names = list(FASHION_MNIST.class_names)
    head = load_adapter(run / "adapter.safetensors", bundle=bundle, class_names=names)
    state = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    assert torch.equal(head.weight, state["adapter.weight"]) and torch.equal(head.bias, state["adapter.bias"])
    config = (run / "config.yaml").read_text()
    assert (run / "adapter.yaml").read_text() == config and "shots: 2" in config
    meta = adapter_metadata(run / "adapter.safetensors")
    assert meta["config"] == config and meta["kind"] == "linear_probe"

    # TensorBoard holds the curves; the best val accuracy in them is the one the adapter was kept for.
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/zero_shot_acc"} <= tags, tags
    val_acc = [e.value for e in events.Scalars("val/acc")]
    assert len(val_acc) == 4
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val_acc"] == pytest.approx(max(val_acc))
    assert metrics["epoch"] == val_acc.index(max(val_acc))
    assert metrics["dataset"] == "fashion_mnist" and metrics["shots"] == 2 and metrics["seed"] == 1
    assert metrics["test_size"] == 100 and 0.0 <= metrics["test_acc"] <= 1.0
    lr = [e.value for e in events.Scalars("train/lr")]
    assert lr[0] == pytest.approx(0.01) and lr[-1] < lr[0]  # cosine schedule from the configured lr
    assert len(events.Scalars("train/loss")) == 4
    assert "val/confusion_matrix" in events.Tags()["images"]


def test_train_with_two_ddp_processes_on_cpu_writes_one_checkpoint(data_root, tiny_clip_path, tmp_path):
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    proc = _train("coop.yaml", data_root, tmp_path, tiny_clip_path, "--trainer.max_epochs", "2", *ddp)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
    run = tmp_path / "runs" / "fashion_mnist_coop" / "k2_seed1"
    assert len(list((tmp_path / "runs").rglob("*.ckpt"))) == 1
    assert (run / "checkpoints" / "best.ckpt").exists()
    assert len(list((tmp_path / "runs").rglob("adapter.safetensors"))) == 1
    # The checkpoint holds only the trainable context, never the frozen CLIP weights.
    state = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    assert list(state) == ["adapter.ctx"]
    assert json.loads((run / "metrics.json").read_text())["method"] == "coop"


def test_rerunning_a_run_replaces_its_outputs_only(tmp_path):
    run = tmp_path / "fashion_mnist_coop" / "k1_seed1"
    (run / "checkpoints").mkdir(parents=True)
    for name in (
        "checkpoints/best.ckpt",
        "adapter.safetensors",
        "metrics.json",
        "events.out.tfevents.1.x",
        "mine.txt",
    ):
        (run / name).write_text("x")
    clear_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == ["mine.txt"]
