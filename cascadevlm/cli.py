"""Command-line entry points (``train.py``, ``evaluate.py``, the ``cascadevlm-*`` scripts)."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden

from cascadevlm.errors import one_line_errors, parser_kwargs
from cascadevlm.logs import add_console_arguments, setup_logging, verbosity, verbosity_from_args, verbosity_of

# Modules defining the classes a command line may name (``--model PromptTuningModule``,
# ``--lvlm TransformersBackend``): jsonargparse resolves a short class name, and ``--help`` lists a
# "known subclass", only among subclasses already imported, so the entry points import these first.
TRAIN_CLASSES = ("cascadevlm.clip.adapters", "cascadevlm.lvlm.lora")
LVLM_CLASSES = ("cascadevlm.lvlm.transformers_backend", "cascadevlm.lvlm.api_backend")


def register_classes(modules: tuple[str, ...]) -> None:
    """Import ``modules`` so their LightningModule / DataModule / LVLMBackend subclasses have short names."""
    for name in modules:
        importlib.import_module(name)


DEFAULT_RUNS_DIR = "runs/train"
# What a training run writes into its directory; cleared when the same run is started again.
RUN_OUTPUTS = (
    "checkpoints",
    "adapter.safetensors",
    "adapter.yaml",
    "metrics.json",
    "config.yaml",
    "hparams.yaml",
)


class TrainCLI(LightningCLI):
    """LightningCLI whose default logger is TensorBoard in a run directory named after the run.

    When the data module has ``run_name(method) -> (experiment, version)`` and the model a ``method``
    (the adapter modules do), logs go to ``<default_root_dir or runs/train>/<experiment>/<version>``,
    e.g. ``runs/train/flowers102_linear_probe/k16_seed1``; a configured ``trainer.logger`` is kept.
    """

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            name = self.run_name()
            if name is not None:
                root = config.get("default_root_dir") or DEFAULT_RUNS_DIR
                kwargs["logger"] = TensorBoardLogger(
                    root, name=name[0], version=name[1], default_hp_metric=False
                )
                if self.subcommand == "fit":  # validate/test/predict read a run, never replace it
                    clear_run_dir(Path(root) / name[0] / name[1])
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """Test the checkpoint the adapter was exported from on the data module's test split, through the
        module's ``test_step`` (its torchmetrics), when both exist; the numbers go to ``metrics.json``."""
        trainer, dm = self.trainer, self.datamodule
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "")
        has_test = dm is not None and dict(getattr(dm, "hparams", {})).get("test_split") is not None
        if trainer.interrupted or not ckpt or not has_test or not is_overridden("test_step", self.model):
            return
        trainer.test(self.model, datamodule=dm, ckpt_path=ckpt, verbose=False)

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # validate/test have Lightning's own --verbose (print the results); it brings the details back too
        own = "verbose" in self._subcommand_method_arguments.get(subcommand, ())
        add_console_arguments(parser, verbose=not own)
        return parser

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        own = "verbose" in self._subcommand_method_arguments.get(self.subcommand, ())
        verbose = verbosity() == "verbose" if own else bool(cfg.get("verbose"))
        setup_logging(verbosity_of(verbose, bool(cfg.get("quiet"))))

    def run_name(self) -> tuple[str, str] | None:
        method = getattr(self.model, "method", None)
        namer = getattr(self.datamodule, "run_name", None)
        return namer(method) if method and callable(namer) else None


@rank_zero_only
def clear_run_dir(run_dir: Path) -> None:
    """Re-running the same (dataset, method, k, seed) replaces its outputs, so curves never mix runs."""
    if not run_dir.is_dir():
        return
    stale = [
        p for p in run_dir.iterdir() if p.name in RUN_OUTPUTS or p.name.startswith("events.out.tfevents")
    ]
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if stale:
        rank_zero_info(f"replacing the previous run in {run_dir}")


@one_line_errors
def train_main(args: list[str] | None = None) -> TrainCLI:
    """``train.py``: ``python train.py fit --config configs/method/<method>.yaml --data
    configs/data/<dataset>.yaml [--data.shots 4 ...]`` (later files and flags override earlier ones)."""
    register_classes(TRAIN_CLASSES)
    setup_logging(verbosity_from_args(sys.argv[1:] if args is None else args))
    subcommands = ("fit", "validate", "test", "predict")
    return TrainCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={**parser_kwargs(), **{c: parser_kwargs() for c in subcommands}},
        args=args,
    )


@one_line_errors
def evaluate_main(args: list[str] | None = None) -> dict | None:
    """``evaluate.py``: the cascade evaluation (see :mod:`cascadevlm.cascade.evaluate`)."""
    from cascadevlm.cascade.evaluate import main

    register_classes(LVLM_CLASSES)
    return main(args)


COMMANDS = {"evaluate": evaluate_main, "train": train_main}


def main(argv: list[str] | None = None):
    """``python -m cascadevlm.cli evaluate ...`` / ``python -m cascadevlm.cli train fit ...``: the installed
    entry points (the same as the ``cascadevlm-evaluate`` / ``cascadevlm-train`` scripts)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m cascadevlm.cli {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        raise SystemExit(2)
    # sys.argv stays as it is: Lightning's DDP launcher starts the other ranks with the same command line.
    # LightningCLI then warns that it got both args and a command line; here that is intended.
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
