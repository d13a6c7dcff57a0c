"""Checkpoint callback: exports the best adapter as safetensors, plus figures for TensorBoard."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from cascadevlm.records import atomic_write_text

if TYPE_CHECKING:
    from cascadevlm.clip.adapters.module import AdapterModule


class AdapterCheckpoint(ModelCheckpoint):
    """Keep the best checkpoint by ``val/acc``; next to it, write the adapter alone and its config.

    In the run directory (the logger's ``log_dir``): ``checkpoints/best.ckpt``, ``adapter.safetensors``,
    ``adapter.yaml`` (the run's config) and ``metrics.json`` (best val accuracy, epoch, and at the end
    the test accuracy of the saved adapter beside zero-shot when the data module has a test split).

    The data module's ``selection`` picks the adapter exported: the best epoch by ``val/acc``
    (``val``, ``val_split``), or with ``last`` the last epoch (``checkpoints/last.ckpt``, exported when
    training ends). The choice is recorded in ``metrics.json`` and in the adapter file.
    """

    def __init__(self, filename: str = "best", monitor: str = "val/acc", mode: str = "max", **kwargs) -> None:
        kwargs.setdefault("save_top_k", 1)
        kwargs.setdefault("enable_version_counter", False)
        kwargs.setdefault("auto_insert_metric_name", False)
        # Save right after validation, when val/acc is new (not at the end of the training epoch).
        kwargs.setdefault("save_on_train_epoch_end", False)
        super().__init__(filename=filename, monitor=monitor, mode=mode, **kwargs)
        self.metrics: dict = {}
        self._run_dir: Path | None = None
        self.selection = "val_split"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.selection = getattr(trainer.datamodule, "selection", None) or "val_split"
        if self.selection == "last":  # keep the latest checkpoint, whatever its val/acc
            self.monitor, self.filename = None, "last"
        super().setup(trainer, pl_module, stage)
        # trainer.log_dir is a collective under DDP: read it here, on every rank, not in rank-0 code.
        self._run_dir = Path(trainer.log_dir or trainer.default_root_dir)

    def _should_skip_saving_checkpoint(self, trainer: L.Trainer) -> bool:
        # A training-free method (Tip-Adapter) takes no optimiser step: Lightning would never save at
        # step 0, but its one validated epoch is the adapter.
        if trainer.global_step == 0 and not self.best_model_path and not trainer.sanity_checking:
            return bool(trainer.fast_dev_run) or trainer.state.fn != "fit"
        return super()._should_skip_saving_checkpoint(trainer)

    def run_dir(self, trainer: L.Trainer) -> Path:
        return self._run_dir

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.selection == "last":
            super().on_validation_end(trainer, pl_module)
            if not trainer.sanity_checking and trainer.is_global_zero:
                self.metrics = self._val_metrics(trainer, trainer.callback_metrics.get("val/acc"))
            return
        before = self.best_model_score
        super().on_validation_end(trainer, pl_module)
        improved = self.best_model_score is not None and (before is None or self.best_model_score != before)
        if trainer.sanity_checking or not improved or not trainer.is_global_zero:
            return
        self.metrics = self._val_metrics(trainer, self.best_model_score)
        self.export(trainer, pl_module)

    def _val_metrics(self, trainer: L.Trainer, val_acc) -> dict:
        metrics = {"epoch": int(trainer.current_epoch), "step": int(trainer.global_step)}
        if val_acc is not None:
            metrics["val_acc"] = float(val_acc)
        zs = trainer.callback_metrics.get("val/zero_shot_acc")
        if zs is not None:
            metrics["zero_shot_val_acc"] = float(zs)
        return metrics

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.selection != "last" or not trainer.is_global_zero:
            return
        # the last epoch's adapter; val/acc is the last validation's (its epoch kept as val_epoch)
        last = {"epoch": max(int(trainer.current_epoch) - 1, 0), "step": int(trainer.global_step)}
        if "epoch" in self.metrics:
            self.metrics["val_epoch"] = self.metrics["epoch"]
        self.metrics.update(last)
        self.export(trainer, pl_module)

    def export(self, trainer: L.Trainer, pl_module: AdapterModule) -> Path:
        run = self.run_dir(trainer)
        config = run / "config.yaml"  # written by LightningCLI's SaveConfigCallback at setup
        config_text = config.read_text() if config.exists() else _hparams_yaml(trainer, pl_module)
        (run / "adapter.yaml").write_text(config_text)
        path = pl_module.save_adapter(
            run / "adapter.safetensors", config=config_text, metrics=self.describe(trainer)
        )
        self.write_metrics(trainer)
        return path

    def describe(self, trainer: L.Trainer) -> dict:
        return {**run_identity(trainer.lightning_module, trainer.datamodule), **self.metrics}

    def write_metrics(self, trainer: L.Trainer) -> None:
        # atomic: rewritten at each better epoch while a report over the runs (report.kshot) may read it
        text = json.dumps(self.describe(trainer), indent=1)
        atomic_write_text(self.run_dir(trainer) / "metrics.json", text)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Add the test split's accuracies to ``metrics.json``: the module's torchmetrics (``test/acc``,
        ``test/zero_shot_acc``) on the checkpoint tested (``train.py`` tests the exported one after
        ``fit``; ``train.py test --ckpt_path`` any other)."""
        found = {
            key: float(trainer.callback_metrics[name])
            for key, name in (("test_acc", "test/acc"), ("zero_shot_test_acc", "test/zero_shot_acc"))
            if name in trainer.callback_metrics
        }
        if not trainer.is_global_zero or not found:
            return
        path = self.run_dir(trainer) / "metrics.json"
        if not self.metrics and path.exists():  # a test of an earlier run: keep what its fit wrote
            earlier = json.loads(path.read_text())
            self.metrics = {k: v for k, v in earlier.items() if k not in self.describe(trainer)}
        loaders = trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        self.metrics.update(found, test_size=sum(len(dl.dataset) for dl in loaders))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write_metrics(trainer)


# The checkpoint key holding :func:`run_identity` of the run that trained the weights.
RUN_KEY = "cascadevlm_run"
# identity key -> (the flag that sets it, Lightning's datamodule hparam of checkpoints written before RUN_KEY)
IDENTITY_FLAGS = {
    "method": ("--model (or --config configs/method/<method>.yaml)", None),
    "dataset": ("--data.dataset", None),
    "shots": ("--data.shots", "shots"),
    "seed": ("--data.seed", "seed"),
    "selection": ("--data.selection / --data.val_split", None),
    "model_name": ("--model.model_name", None),
    "weights_id": ("--model.pretrained", None),
}


def recorded_selection(dm) -> str | None:
    """The data module's selection protocol as recorded (``test_split`` when chosen on the test split)."""
    return getattr(dm, "recorded_selection", None) or getattr(dm, "selection", None)


def run_identity(pl_module: L.LightningModule, dm) -> dict:
    """What decides a run's directory and table cell: method, dataset, k, seed, selection, CLIP model
    and weights (metrics.json, the adapter file and every checkpoint record it)."""
    info = {"method": getattr(pl_module, "method", None)}
    bundle = getattr(pl_module, "bundle", None)
    if bundle is not None:
        info.update(model_name=bundle.model_name, weights_id=bundle.weights_id, pretrained=bundle.pretrained)
    info.update(
        dataset=getattr(dm, "name", None),
        shots=getattr(dm, "shots", None),
        seed=getattr(dm, "seed", None),
        selection=recorded_selection(dm),
    )
    return info


def check_checkpoint_run(ckpt_path: str | Path, pl_module: L.LightningModule, dm) -> None:
    """Refuse, in one line naming the flags, to validate/test/predict a checkpoint under settings other
    than its own: its results would be written into another run's directory (``metrics.json``)."""
    from lightning.fabric.utilities.cloud_io import _load as pl_load

    if str(ckpt_path) in ("best", "last", "hpc", "registry"):  # Lightning's own names, of this very run
        return
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt_path)!r} does not exist; set --ckpt_path")
    try:
        try:  # tensors and plain data only: the project's checkpoints hold nothing else
            ckpt = pl_load(ckpt_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # other objects: Lightning unpickles this file next anyway
            ckpt = pl_load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(
            f"{str(ckpt_path)!r} is not a Lightning checkpoint ({err}); set --ckpt_path"
        ) from None
    saved = dict(ckpt.get(RUN_KEY) or {})
    old = ckpt.get("datamodule_hyper_parameters") or {}
    for key, (_, hparam) in IDENTITY_FLAGS.items():  # a checkpoint from before RUN_KEY: what Lightning kept
        if key not in saved and hparam is not None and hparam in old:
            saved[key] = old[hparam]
    ours = run_identity(pl_module, dm)
    wrong = [k for k in IDENTITY_FLAGS if saved.get(k) is not None and ours.get(k) != saved[k]]
    if wrong:
        diffs = ", ".join(f"{k} {saved[k]!r} (here {ours.get(k)!r}, {IDENTITY_FLAGS[k][0]})" for k in wrong)
        raise ValueError(
            f"checkpoint {str(ckpt_path)!r} was trained with {diffs}: its results would go into another "
            "run's metrics.json; give the flags the checkpoint's own settings, or the checkpoint of this run"
        )


def _hparams_yaml(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """A config when no LightningCLI config file exists (training from Python)."""
    import yaml

    def plain(hp) -> dict:
        return {k: v for k, v in dict(hp).items() if isinstance(v, (str, int, float, bool, list, type(None)))}

    cfg = {"model": {"class_path": f"{type(pl_module).__module__}.{type(pl_module).__name__}"}}
    cfg["model"]["init_args"] = plain(pl_module.hparams)
    dm = trainer.datamodule
    if dm is not None:
        cfg["data"] = {
            "class_path": f"{type(dm).__module__}.{type(dm).__name__}",
            "init_args": plain(dm.hparams),
        }
    return yaml.safe_dump(cfg, sort_keys=False)


def confusion_figure(confusion: torch.Tensor, class_names: list[str], title: str):
    """A matplotlib figure of a confusion matrix, rows normalised (true class -> predicted class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    rates = confusion.float() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    size = min(4 + 0.25 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 50:  # past that the labels are unreadable; the pattern still shows
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig
