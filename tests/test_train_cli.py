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
# a linear-probe run's experiment on the tiny CLIP: dataset, CLIP model and weights (file stem), method
TINY_RUN = "fashion_mnist_cascadevlm-tiny-vit_cascadevlm-tiny-vit-seed0_linear_probe"


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


def test_train_writes_best_checkpoint_adapter_config_and_tensorboard_curves(
    data_root, tiny_clip_path, tmp_path
):
    tiny = tiny_clip_path
    _train("linear_probe.yaml", data_root, tmp_path, tiny, "--trainer.max_epochs", "4")
    run = tmp_path / "runs" / TINY_RUN / "k2_seed1"
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
    run = tmp_path / "runs" / TINY_RUN.replace("linear_probe", "coop") / "k2_seed1"
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


# ---- in-process train.py runs (fast): refusals and where a run's results go
def _common(tiny_clip: Path, data_root: Path, tmp: Path, *extra: str) -> list[str]:
    """train.py options: the demo's linear probe on the tiny CLIP, k=1, small val/test splits."""
    return [
        "--config", str(REPO / "configs" / "method" / "linear_probe.yaml"),
        "--config", str(REPO / "configs" / "experiments" / "demo_linear_probe.yaml"),
        "--model.pretrained", str(tiny_clip), "--data.data_root", str(data_root),
        "--data.cache_dir", str(tmp / "features"), "--data.splits_dir", str(tmp / "splits"),
        "--data.shots", "1", "--data.val_limit", "20", "--data.test_limit", "30",
        "--trainer.default_root_dir", str(tmp / "runs"), "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra,
    ]  # fmt: skip


def _refused(entry, args: list[str], capsys, monkeypatch) -> str:
    """The one ``error:`` line (exit status 2, no traceback) ``entry(args)`` ends with."""
    monkeypatch.delenv("CASCADEVLM_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        entry(args)
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def _run_dirs(root: Path) -> list[str]:
    return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("metrics.json"))


def test_selection_on_the_test_split_is_refused_before_training(
    data_root, tiny_clip_path, tmp_path, capsys, monkeypatch
):
    from cascadevlm.cli import train_main

    line = _refused(train_main, ["fit", *_common(tiny_clip_path, data_root, tmp_path, "--data.val_split", "test")],
                    capsys, monkeypatch)  # fmt: skip
    assert line == (
        "error: data.val_split='test' is the test split: the best epoch (and Tip-Adapter's alpha/beta) would "
        "be chosen on the images test_acc is measured on; set --data.val_split to a validation split, or "
        "--data.selection val (k images per class from the train split) or last, or "
        "--data.allow_selection_on_test true to do it knowingly (recorded as selection test_split)"
    )
    assert not (tmp_path / "runs").exists()


def test_selection_on_test_when_asked_is_named_in_the_run_the_adapter_metrics_and_kshot_table(
    data_root, tiny_clip_path, tmp_path
):
    from cascadevlm.cli import train_main
    from cascadevlm.clip.adapters import adapter_info
    from cascadevlm.report.kshot import aggregate, collect_runs, markdown_table

    train_main(["fit", *_common(tiny_clip_path, data_root, tmp_path, "--data.val_split", "test",
                                "--data.allow_selection_on_test", "true")])  # fmt: skip
    assert _run_dirs(tmp_path / "runs") == [f"{TINY_RUN}/k1_seed1_seltest_split"]
    run = tmp_path / "runs" / TINY_RUN / "k1_seed1_seltest_split"
    assert json.loads((run / "metrics.json").read_text())["selection"] == "test_split"
    assert adapter_info(run / "adapter.safetensors")["selection"] == "test_split"
    assert "| linear_probe (selection test_split) |" in markdown_table(
        aggregate(collect_runs(tmp_path / "runs"))
    )


def test_testing_a_checkpoint_under_other_flags_is_refused_and_its_own_run_gets_its_result(
    data_root, tiny_clip_path, tmp_path, capsys, monkeypatch
):
    """train.py test --ckpt_path <k=1 best.ckpt> --data.shots 2 wrote k=1's accuracy as k=2's."""
    from cascadevlm.cli import train_main

    common = _common(tiny_clip_path, data_root, tmp_path)
    train_main(["fit", *common])
    run = tmp_path / "runs" / TINY_RUN / "k1_seed1"
    ckpt = run / "checkpoints" / "best.ckpt"
    fitted = json.loads((run / "metrics.json").read_text())
    line = _refused(train_main, ["test", *common, "--ckpt_path", str(ckpt), "--data.shots", "2", "--data.seed", "3"],
                    capsys, monkeypatch)  # fmt: skip
    assert line == (
        f"error: checkpoint {str(ckpt)!r} was trained with shots 1 (here 2, --data.shots), seed 1 (here 3, "
        "--data.seed): its results would go into another run's metrics.json; give the flags the checkpoint's "
        "own settings, or the checkpoint of this run"
    )
    assert _run_dirs(tmp_path / "runs") == [f"{TINY_RUN}/k1_seed1"]
    assert json.loads((run / "metrics.json").read_text()) == fitted

    # under its own settings the test lands in its own run, with the accuracy the fit measured
    (run / "metrics.json").write_text(json.dumps({k: v for k, v in fitted.items() if k != "test_acc"}))
    train_main(["test", *common, "--ckpt_path", str(ckpt)])
    assert json.loads((run / "metrics.json").read_text())["test_acc"] == pytest.approx(fitted["test_acc"])


def test_fit_from_a_checkpoint_resumes_its_own_run_and_refuses_another_settings(
    data_root, tiny_clip_path, tmp_path, capsys, monkeypatch
):
    """fit --ckpt_path <the run's best.ckpt> cleared the run first, deleting that checkpoint (traceback)."""
    from cascadevlm.cli import train_main

    common = _common(tiny_clip_path, data_root, tmp_path)
    train_main(["fit", *common])
    ckpt = tmp_path / "runs" / TINY_RUN / "k1_seed1" / "checkpoints" / "best.ckpt"
    line = _refused(
        train_main, ["fit", *common, "--ckpt_path", str(ckpt), "--data.shots", "2"], capsys, monkeypatch
    )
    assert line.startswith(
        f"error: checkpoint {str(ckpt)!r} was trained with shots 1 (here 2, --data.shots):"
    )
    cli = train_main(["fit", *common, "--ckpt_path", str(ckpt), "--trainer.max_epochs", "2"])
    assert cli.trainer.current_epoch == 2 and ckpt.is_file()
    assert _run_dirs(tmp_path / "runs") == [f"{TINY_RUN}/k1_seed1"]


def test_fits_with_other_clip_weights_keep_each_others_runs(
    data_root, tiny_clip_path, tmp_path, capsys, monkeypatch
):
    """A fit with other weights (same dataset, method, k, seed) emptied the earlier run's directory."""
    from cascadevlm.cli import train_main
    from cascadevlm.zoo.tiny_clip import build_tiny_clip

    other = build_tiny_clip(tmp_path / "other", seed=1)
    train_main(["fit", *_common(tiny_clip_path, data_root, tmp_path)])
    train_main(["fit", *_common(other, data_root, tmp_path)])
    runs = tmp_path / "runs"
    other_run = "fashion_mnist_cascadevlm-tiny-vit_cascadevlm-tiny-vit-seed1_linear_probe"
    assert _run_dirs(runs) == [f"{TINY_RUN}/k1_seed1", f"{other_run}/k1_seed1"]
    for name in (TINY_RUN, other_run):
        run = runs / name / "k1_seed1"
        assert {"adapter.safetensors", "metrics.json", "checkpoints"} <= {p.name for p in run.iterdir()}
    ids = {
        json.loads((runs / n / "k1_seed1" / "metrics.json").read_text())["weights_id"]
        for n in (TINY_RUN, other_run)
    }
    assert len(ids) == 2

    # other weights under the same file name (another folder): the run name cannot tell, so it refuses
    same_stem = tmp_path / "copy" / tiny_clip_path.name
    same_stem.parent.mkdir()
    same_stem.write_bytes(other.read_bytes())
    before = (runs / TINY_RUN / "k1_seed1" / "metrics.json").read_text()
    line = _refused(train_main, ["fit", *_common(same_stem, data_root, tmp_path)], capsys, monkeypatch)
    assert line.startswith(
        f"error: {runs / TINY_RUN / 'k1_seed1'} holds the results of another CLIP (weights_id "
    )
    assert line.endswith(
        "and this run would replace them; set --trainer.default_root_dir to another folder (or move that run)"
    )
    assert (runs / TINY_RUN / "k1_seed1" / "metrics.json").read_text() == before


@pytest.mark.parametrize("flag", ["--optimizer", "--lr_scheduler", "--optimizer.lr"])
def test_lightning_optimizer_flags_are_refused_in_one_line(flag, capsys, monkeypatch):
    from cascadevlm.cli import evaluate_main, train_main

    line = _refused(train_main, ["fit", flag, "SGD"], capsys, monkeypatch)
    assert line == (
        f"error: {flag} is not an option here: the adapter modules configure their own optimiser: set "
        "--model.optimizer (adamw or sgd), --model.lr, --model.weight_decay and --model.warmup_steps (cosine schedule)"
    )
    assert _refused(evaluate_main, [f"{flag}=SGD"], capsys, monkeypatch) == (
        f"error: {flag} is not an option here: evaluate.py trains nothing"
    )


def test_lightning_optimizer_flags_are_not_in_help(capsys):
    from cascadevlm.cli import evaluate_main, train_main

    for entry, args in ((train_main, ["fit", "--help_all"]), (evaluate_main, ["--help_all"])):
        with pytest.raises(SystemExit):
            entry(args)
        out = capsys.readouterr().out
        assert "--trainer.max_epochs" in out and "--optimizer" not in out and "--lr_scheduler" not in out


DEVICES_ERROR = (
    "error: trainer.devices must be a number of devices >= 1, -1 (all), 'auto' or a list of device ids, "
    "got 0; set --trainer.devices"
)
WORKERS_ERROR = "error: data.num_workers must be an integer >= 0 (0: load in the main process), got -1; set --data.num_workers"


@pytest.mark.parametrize("flag, value, expected", [("--trainer.devices", "0", DEVICES_ERROR),
                                                   ("--data.num_workers", "-1", WORKERS_ERROR)])  # fmt: skip
def test_devices_0_and_negative_workers_are_one_line_errors_in_both_entries(
    flag, value, expected, data_root, tiny_clip_path, tmp_path, capsys, monkeypatch
):
    from fake_cascade import fake_args

    from cascadevlm.cli import evaluate_main, train_main

    assert _refused(train_main, ["fit", *_common(tiny_clip_path, data_root, tmp_path, f"{flag}={value}")],
                    capsys, monkeypatch) == expected  # fmt: skip
    assert _refused(evaluate_main, fake_args(tiny_clip_path, data_root, tmp_path, "r", f"{flag}={value}"),
                    capsys, monkeypatch) == expected  # fmt: skip
    assert not (tmp_path / "runs").exists() and not (tmp_path / "r").exists()
