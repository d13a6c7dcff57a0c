"""The console of `evaluate.py` on the demo (stage-named bars, no third-party noise, --quiet), the run's
TensorBoard (one set of curves after a rerun, sweep steps = permille sent to the LVLM, hparams),
metrics.json's class names and templates, and the logging set-up (levels, rank 0 only, --verbose)."""

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.logs import setup_logging, verbosity_from_args

REPO = Path(__file__).resolve().parents[1]

# What a person must not see on the default console (before: each of these appeared in `make demo`).
NOISE = [
    "litlogger",  # Lightning's cloud-logging tip
    "Tip:",
    "LeafSpec",  # torch pytree deprecation through Lightning
    "deprecated",
    "No pretrained weights loaded",  # open_clip, for a checkpoint that is then loaded
    "initialized randomly",
    "Loading weights",  # Hugging Face's weight-loading bar
    "shards",  # Hugging Face's shard-writing bar
    "Predicting",  # Lightning's unnamed prediction bar
    "GPU available",
    "Seed set to",
]
STAGES = ["CLIP stage: test", "CLIP stage: val (for the budget)", "LVLM stage"]


def _evaluate(data_root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The demo's config (trained miniature CLIP and LLaVA) on 24 test images, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "COLUMNS")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, str(REPO / "evaluate.py"), "--config", "configs/demo.yaml",
           "--data.data_root", str(data_root), "--data.limit", "24", "--cascade.lvlm_batch_size", "8",
           "--output_dir", str(out / "runs"), "--cache_dir", str(out / "cache"), "--run_name", "r", *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _scalars(log_dir: Path) -> dict[str, list]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def _small_demo_data(data_root: Path, root: Path) -> Path:
    """The demo dataset with 300 validation images (tau's budget split) instead of 5000: a fast CLIP stage."""
    import datasets

    full = datasets.load_from_disk(str(data_root / "fashion_mnist"))
    small = datasets.DatasetDict({s: full[s].select(range(min(300, len(full[s])))) for s in full})
    small.save_to_disk(str(root / "fashion_mnist"))
    return root


@pytest.fixture(scope="module")
def demo_runs(data_root, tmp_path_factory):
    """The demo evaluated once, then again into the same run directory with --quiet."""
    out = tmp_path_factory.mktemp("console")
    small = _small_demo_data(data_root, out / "data")
    first = _evaluate(small, out)
    run_dir = out / "runs" / "r"
    scalars_first = _scalars(run_dir / "tensorboard")
    second = _evaluate(small, out, "--quiet")
    return {"first": first, "second": second, "run_dir": run_dir, "scalars_first": scalars_first}


def test_demo_console_names_each_stage_and_has_no_third_party_noise(demo_runs):
    p = demo_runs["first"]
    console = p.stdout + p.stderr
    found = [n for n in NOISE if n in console]
    assert not found, f"noise on the console: {found}\n{p.stderr}"
    for name in STAGES:
        assert name in p.stderr, f"no {name!r} bar:\n{p.stderr}"
    assert "images/s" in p.stderr
    lvlm_bar = next(line for line in p.stderr.splitlines() if line.startswith("LVLM stage ━"))
    assert "24 images" in lvlm_bar and "cached 0 · asked 24 · failed 0" in lvlm_bar
    # stdout holds the results table only; status and bars are on stderr
    assert p.stdout.startswith("# r\n") and "CLIP stage" not in p.stdout


def test_quiet_rerun_prints_no_status_and_keeps_the_table(demo_runs):
    p = demo_runs["second"]
    assert p.stderr.strip() == "", p.stderr
    assert p.stdout.startswith("# r\n") and "| top-1 acc |" in p.stdout


def test_rerun_leaves_one_curve_per_tag_stepped_by_permille_sent_to_the_lvlm(demo_runs):
    run_dir = demo_runs["run_dir"]
    first, again = demo_runs["scalars_first"], _scalars(run_dir / "tensorboard")
    assert set(again) == set(first) and {"sweep/acc1", "sweep/tau", "metrics/acc1"} <= set(again)
    for tag, events in again.items():
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)) == len(first[tag]), f"{tag}: {steps}"
    with (run_dir / "sweep.csv").open() as fh:
        permille = {round(1000 * float(r["deferral"])) for r in csv.DictReader(fh)}
    assert [e.step for e in again["sweep/acc1"]] == sorted(permille)
    assert min(permille) == 0 and max(permille) == 1000  # CLIP only .. the LVLM on every image
    acc = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")


def test_metrics_json_holds_the_class_names_and_templates_used(demo_runs, data_root):
    saved = json.loads((demo_runs["run_dir"] / "metrics.json").read_text())
    dm = CascadeDataModule("fashion_mnist", data_root=str(data_root))
    assert saved["class_names"] == list(dm.class_names) and len(saved["class_names"]) == 10
    assert saved["templates"] == list(dm.templates) and all("{}" in t for t in saved["templates"])


@pytest.fixture
def console_state():
    yield
    setup_logging("normal")


def test_console_levels_and_rank_zero(console_state, capsys, monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    project, lightning, root = (logging.getLogger(n) for n in ("cascadevlm.x", "lightning.pytorch", ""))
    setup_logging("normal")
    project.info("status line")
    lightning.info("GPU available: False")
    root.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
    project.warning("a real problem")
    assert capsys.readouterr().err.splitlines() == ["status line", "warning: a real problem"]

    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)  # another DDP rank: warnings only
    project.info("status line")
    project.warning("a real problem")
    assert capsys.readouterr().err.splitlines() == ["warning: a real problem"]
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)

    setup_logging("quiet")
    project.info("status line")
    assert capsys.readouterr().err == ""

    setup_logging("verbose")  # the details come back
    project.debug("detail")
    lightning.info("GPU available: False")
    root.warning("No pretrained weights loaded for model 'x'.")
    err = capsys.readouterr().err
    assert "[cascadevlm.x] detail" in err and "No pretrained weights" in err
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"


def test_a_basic_config_handler_does_not_double_every_line(console_state, capsys):
    """A module-level ``logging.info()`` before set-up gives the root logger basicConfig's stderr handler;
    bench/cascade.py then printed each status line twice, once as "INFO:name:message"."""
    logging.basicConfig(force=True)  # what logging.info() does to a root logger without handlers
    setup_logging("normal")
    logging.getLogger("cascadevlm.x").info("status line")
    assert capsys.readouterr().err.splitlines() == ["status line"]


def test_console_flags_are_read_before_parsing():
    assert verbosity_from_args(["--config", "c.yaml"]) == "normal"
    assert verbosity_from_args(["fit", "--quiet"]) == "quiet"
    assert verbosity_from_args(["--verbose=true"]) == "verbose"
    assert verbosity_from_args(["test", "--verbose", "false"]) == "normal"


def test_stage_counts_images_and_lvlm_answers(console_state, capsys):
    """progress.stage on a real Trainer: images counted batch by batch, the LVLM's cached/asked/failed."""
    import lightning as L
    import torch

    from cascadevlm.progress import LVLMCounts, StageProgressBar, stage

    class Backend:  # answers every other image from its cache; one failed API call
        calls = 0

    class Stage(L.LightningModule):
        def predict_step(self, batch, batch_idx):
            Backend.calls += len(batch) // 2
            return [type("Answer", (), {"fallback": "api_error" if b == 3 else None})() for b in batch]

    setup_logging("normal")
    trainer = L.Trainer(
        accelerator="cpu", logger=False, callbacks=[StageProgressBar()], enable_model_summary=False
    )
    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=4, collate_fn=list)
    counts = LVLMCounts(Backend, answered_before=7)
    with stage(trainer, "LVLM stage", counts, show_bar=False):  # hidden bar: the summary is logged
        trainer.predict(Stage(), loader, return_predictions=False)
    assert (counts.images, counts.asked, counts.failed, counts.cached) == (10, 2 + 2 + 1, 1, 7 + 5)
    err = capsys.readouterr().err
    assert "LVLM stage: 10 images in" in err and "cached 12 · asked 5 · failed 1" in err
    assert "Predicting" not in err and trainer.progress_bar_callback.is_enabled  # the bar is back
