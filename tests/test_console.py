"""The console of `evaluate.py` on the demo and of `train.py fit` at 80 columns (stage-named bars on one
line each, no third-party noise or warnings, the closing block; --quiet), the run's
TensorBoard (one set of curves after a rerun, sweep steps = permille sent to the LVLM, hparams),
metrics.json's class names and templates, and the logging set-up (levels, rank 0 only, --verbose)."""

import csv
import json
import logging
import os
import re
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
    "Warning",  # a raw warnings.warn line ("UserWarning", "PossibleUserWarning")
    "warning:",  # a logged warning
    "configure_optimizers",  # Lightning on Tip-Adapter's fit, which has no optimiser on purpose
    "in eval mode at the start",  # Lightning on a frozen CLIP under a trained adapter
    "args parameter is intended",  # LightningCLI on an entry given args=
]
COLUMNS = 80
BAR = "━"
STAGES = ["CLIP stage: test", "CLIP stage: val (for the budget)", "LVLM stage"]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python <script> <args>`` in a fresh process, as in an 80-column terminal (``COLUMNS``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "COLUMNS")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               COLUMNS=str(COLUMNS))  # fmt: skip
    cmd = [sys.executable, str(REPO / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _evaluate(data_root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The demo's config (trained miniature CLIP and LLaVA) on 24 test images, in a fresh process."""
    return _run("evaluate.py", "--config", "configs/demo.yaml",
                "--data.data_root", str(data_root), "--data.limit", "24", "--cascade.lvlm_batch_size", "8",
                "--output_dir", str(out / "runs"), "--cache_dir", str(out / "cache"), "--run_name", "r", *extra)  # fmt: skip


def _assert_clean_console(p: subprocess.CompletedProcess) -> None:
    """No third-party noise or warning, and every bar on one line that fits the terminal (a bar wider
    than the terminal wraps, and each refresh then leaves a ladder of partial lines)."""
    console = p.stdout + p.stderr
    found = [n for n in NOISE if n in console]
    assert not found, f"noise on the console: {found}\n{console}"
    for line in console.splitlines():
        if BAR in line:
            assert len(line.rstrip()) <= COLUMNS, f"a bar wider than {COLUMNS} columns:\n{line}"
        # a wrapped bar's continuation (Lightning's metrics on a second line) starts with blanks
        assert not (line.startswith(" ") and line.strip()), f"a wrapped line:\n{console}"


def _closing_block(stdout: str, labels: list[str]) -> dict[str, str]:
    """The block stdout ends with: ``run``, ``wrote``, then ``labels``, one "label  value" line each."""
    lines = stdout.rstrip("\n").splitlines()[-(2 + len(labels)) :]
    block = {}
    for line, label in zip(lines, ["run", "wrote", *labels], strict=True):
        assert line.startswith(label + "  "), f"{label!r} expected:\n{stdout}"
        block[label] = line[len(label) :].strip()
    return block


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
    _assert_clean_console(p)
    for name in STAGES:
        assert name in p.stderr, f"no {name!r} bar:\n{p.stderr}"
    lvlm_bar = next(line for line in p.stderr.splitlines() if line.startswith("LVLM stage ━"))
    assert "24 img, " in lvlm_bar and "/s · cached 0, asked 24, failed 0" in lvlm_bar
    # stdout holds the results: the headline table first, the details, the closing block
    assert (
        p.stdout.startswith("# r\n\n| method | top-1 acc | sent to LVLM |\n") and "CLIP stage" not in p.stdout
    )
    block = _closing_block(p.stdout, ["CLIP", "cascade", "LVLM on all"])
    run_dir = demo_runs["run_dir"]
    assert block["run"] == f"{run_dir}/"
    assert block["wrote"] == (
        "records.parquet, metrics.json, summary.md, stages.parquet, sweep.csv, plots/, tensorboard/"
    )
    methods = json.loads((run_dir / "metrics.json").read_text())["methods"]
    cascade = methods["cascade"]
    assert (
        block["cascade"]
        == f"{100 * cascade['acc1']:.2f}% ({100 * cascade['deferral']:.1f}% sent to the LVLM)"
    )
    assert block["CLIP"] == f"{100 * methods['clip']['acc1']:.2f}%"


def test_train_fit_console_ends_with_the_adapter_and_its_numbers(data_root, tmp_path):
    """Tip-Adapter's fit (no optimiser on purpose: Lightning warned) on 1 shot, 30 val and 40 test images."""
    p = _run("train.py", "fit", "--config", "configs/method/tip_adapter.yaml",
             "--config", "configs/experiments/demo_linear_probe.yaml", "--data.shots", "1",
             "--data.val_limit", "30", "--data.test_limit", "40", "--data.data_root", str(data_root),
             "--data.cache_dir", str(tmp_path / "features"), "--data.splits_dir", str(tmp_path / "splits"),
             "--trainer.default_root_dir", str(tmp_path / "runs"))  # fmt: skip
    _assert_clean_console(p)
    assert BAR in p.stderr and BAR not in p.stdout  # bars on stderr; stdout is the result
    block = _closing_block(p.stdout, ["adapter", "best epoch", "val acc", "test acc"])
    run_dir = Path(block["run"].rstrip("/"))
    assert run_dir.parent.parent == tmp_path / "runs" and block["adapter"] == str(
        run_dir / "adapter.safetensors"
    )
    assert (run_dir / "adapter.safetensors").is_file()
    assert (
        block["wrote"]
        == "checkpoints/, adapter.safetensors, adapter.yaml, metrics.json, config.yaml, hparams.yaml"
    )
    m = json.loads((run_dir / "metrics.json").read_text())
    assert block["best epoch"] == str(m["epoch"])
    assert block["test acc"] == (
        f"{100 * m['test_acc']:.2f}% (zero-shot {100 * m['zero_shot_test_acc']:.2f}%) on 40 images"
    )


def test_quiet_rerun_prints_no_status_and_keeps_the_table(demo_runs):
    p = demo_runs["second"]
    assert p.stderr.strip() == "", p.stderr
    assert p.stdout.startswith("# r\n") and "| top-1 acc |" in p.stdout
    assert p.stdout.rstrip().splitlines()[-3].startswith("CLIP  ")  # the closing block stays


def test_demo_page_states_the_pretraining_cpu_time_of_the_manifest():
    """docs/demo.md said "about 20 minutes of CPU" on the pretraining command, 5.3 in its table."""
    manifest = json.loads((REPO / "cascadevlm" / "zoo" / "checkpoints" / "manifest.json").read_text())
    minutes = f"{manifest['total_cpu_seconds'] / 60:.1f}"
    stated = re.findall(r"([\d.]+) min(?:utes)? of CPU", (REPO / "docs" / "demo.md").read_text())
    assert stated and set(stated) == {minutes}, stated


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
    assert "LVLM stage: 10 images in" in err and "cached 12, asked 5, failed 1" in err
    assert "Predicting" not in err and trainer.progress_bar_callback.is_enabled  # the bar is back


def test_the_lvlm_stage_bar_of_a_2000_image_run_fits_80_columns_uncut():
    """The demo's LVLM bar was cut at 80 columns ("asked 1800 · fail…"); a bar never wraps, and the
    counts of a 2000-image stage fit whole."""
    import io

    from rich.console import Console
    from rich.progress import Progress, TextColumn

    from cascadevlm.progress import LVLMCounts, StageProgressBar

    console = Console(file=io.StringIO(), width=COLUMNS)
    metrics = TextColumn("")  # Lightning's metrics column, last and empty while predicting
    progress = Progress(*StageProgressBar().configure_columns(None), metrics, console=console)
    counts = LVLMCounts(type("Backend", (), {"calls": 0})())
    counts.backend.calls, counts.images = 1800, 2000  # 200 of the 2000 answered from the cache
    task = progress.add_task("LVLM stage", total=32, images=2000, note=counts.text())
    progress.update(task, completed=32)
    progress.tasks[0].finished_time = 312.5  # seconds: 6.4 images/s, as the demo measured
    console.print(progress.make_tasks_table(progress.tasks))
    (line,) = console.file.getvalue().splitlines()
    assert len(line.rstrip()) <= COLUMNS and line.rstrip().endswith("/s · cached 200, asked 1800, failed 0")


def test_lightnings_expected_state_warnings_are_kept_out_unless_verbose():
    """A frozen CLIP left in eval mode under an adapter: Lightning's "Found 26 module(s) in eval mode"."""
    import warnings

    from lightning.fabric.utilities.rank_zero import rank_zero_warn

    from cascadevlm.logs import expected_states_quiet

    message = "Found 26 module(s) in eval mode at the start of training. This may lead to unexpected behavior"
    for level, shown in (("normal", 0), ("quiet", 0), ("verbose", 1)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with expected_states_quiet(level):
                rank_zero_warn(message)
                warnings.warn("a warning of ours", UserWarning, stacklevel=1)  # others pass
        assert [str(w.message) for w in seen] == [message] * shown + ["a warning of ours"], level
