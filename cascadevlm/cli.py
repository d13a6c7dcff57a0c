"""Command-line entry points (``train.py``, ``evaluate.py``, the ``cascadevlm-*`` scripts)."""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden

from cascadevlm import progress
from cascadevlm.cascade.evaluate import CascadeOptions, evaluate, join_negative_values
from cascadevlm.cascade.evaluate import _config_dict as config_dict  # what metrics.json records
from cascadevlm.clip.adapters.checkpoint import check_checkpoint_run, run_identity
from cascadevlm.clip.adapters.datamodule import check_num_workers
from cascadevlm.clip.module import ClipClassifier
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.errors import one_line_errors, parser_kwargs
from cascadevlm.logs import (
    add_console_arguments,
    expected_states_quiet,
    setup_logging,
    verbosity,
    verbosity_from_args,
    verbosity_of,
)
from cascadevlm.lvlm.base import LVLMBackend
from cascadevlm.report.summary import closing_block, short_weights
from cascadevlm.report.summary import run_name as join_name

# Modules defining the classes a command line may name (``--model PromptTuningModule``,
# ``--lvlm TransformersBackend``): jsonargparse resolves a short class name, and ``--help`` lists a
# "known subclass", only among subclasses already imported, so the entry points import these first.
TRAIN_CLASSES = ("cascadevlm.clip.adapters", "cascadevlm.lvlm.lora")
LVLM_CLASSES = ("cascadevlm.lvlm.transformers_backend", "cascadevlm.lvlm.api_backend")


def register_classes(modules: tuple[str, ...]) -> None:
    """Import ``modules`` so their LightningModule / DataModule / LVLMBackend subclasses have short names."""
    for name in modules:
        importlib.import_module(name)


# Lightning's option groups: listed after the project's, and by --help_all only (--help names them).
LIGHTNING_GROUPS = ("trainer", "optimizer", "lr_scheduler")


def _lightning_groups(parser) -> list:
    groups = getattr(parser, "groups", None) or {}
    return [groups[k] for k in LIGHTNING_GROUPS if k in groups]


class _ShortHelp(argparse._HelpAction):
    """``--help``: the project's options; Lightning's Trainer options are only named (``--help_all``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        every = parser._action_groups
        hidden = _lightning_groups(parser)
        options = sum(len([a for a in g._group_actions if not a.dest.endswith(".help")]) for g in hidden)
        parser._action_groups = [g for g in every if g not in hidden]
        try:
            text = parser.format_help()
        finally:
            parser._action_groups = every
        if hidden:
            text += f"\nLightning's Trainer options (--trainer.*, {options} more): --help_all\n"
        parser._print_message(text, sys.stdout)
        parser.exit()


class ProjectHelp(LightningCLI):
    """LightningCLI whose ``--help`` lists the project's options (Lightning's under ``--help_all``, after
    the project's), with a one-line usage instead of every flag."""

    def _add_arguments(self, parser) -> None:
        super()._add_arguments(parser)
        lightning = _lightning_groups(parser)
        for group in lightning:
            if group is parser.groups.get("trainer"):
                group.title, group.description = "Lightning's Trainer (--trainer.*)", None
        parser._action_groups = [g for g in parser._action_groups if g not in lightning] + lightning
        parser.usage = "%(prog)s [--config FILE] [--<option> VALUE ...] [--help | --help_all]"
        for action in parser._actions:
            if type(action) is argparse._HelpAction:
                action.__class__ = _ShortHelp
                action.help = "the project's options, then exit"
        parser.add_argument(
            "--help_all",
            action=argparse._HelpAction,
            help="every option, Lightning's Trainer's too, then exit",
        )


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


# Lightning's own optimiser flags (LightningCLI adds them unless told not to): the modules configure
# their own optimiser, so the entry points refuse them with the flags that do apply.
LIGHTNING_OPTIMIZER_FLAGS = ("--optimizer", "--lr_scheduler")


def refuse_lightning_optimizer_flags(argv: list[str], own: str) -> None:
    """Refuse ``--optimizer`` / ``--lr_scheduler`` (and their ``.`` / ``=`` forms) in one line; ``own``
    says which flags set the optimiser instead."""
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if any(flag == f or flag.startswith(f + ".") for f in LIGHTNING_OPTIMIZER_FLAGS):
            raise ValueError(f"{flag} is not an option here: {own}")


def check_loader_and_devices(cfg) -> None:
    """Refuse, before anything is built, ``trainer.devices`` of 0 or below (other than -1, every device)
    and a negative ``data.num_workers`` (Lightning and torch raise tracebacks for both)."""
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, list) and not devices or isinstance(devices, int) and devices < -1 or devices == 0:
        raise ValueError(
            f"trainer.devices must be a number of devices >= 1, -1 (all), 'auto' or a list of device ids, "
            f"got {devices!r}; set --trainer.devices"
        )
    data = cfg.get("data") or {}
    # subclass mode (train.py): class_path + init_args
    data = data.get("init_args", data) if hasattr(data, "get") else {}
    if data and data.get("num_workers") is not None:
        check_num_workers(data.get("num_workers"))


def instantiate_checked_trainer(cli: LightningCLI, **kwargs) -> L.Trainer:
    """``LightningCLI.instantiate_trainer``, Lightning's refusal of a trainer option as one line."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return LightningCLI.instantiate_trainer(cli, **kwargs)
    except MisconfigurationException as err:
        raise ValueError(f"{err} (set the --trainer option it names)") from None


TRAIN_OPTIMIZER_FLAGS = (
    "the adapter modules configure their own optimiser: set --model.optimizer (adamw or sgd), --model.lr, "
    "--model.weight_decay and --model.warmup_steps (cosine schedule)"
)


class TrainCLI(ProjectHelp):
    """LightningCLI whose default logger is TensorBoard in a run directory named after the run.

    When the data module has ``run_name(method) -> (experiment, version)`` and the model a ``method``
    (the adapter modules do), logs go to ``<default_root_dir or runs/train>/<experiment>/<version>``,
    e.g. ``runs/train/flowers102_ViT-L-14_openai_linear_probe/k16_seed1`` (the CLIP model and weights
    named, so other weights never clear this run); a configured ``trainer.logger`` is kept.
    """

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        ckpt = (self.config_init.get(self.subcommand) or {}).get("ckpt_path") if self.subcommand else None
        if ckpt and self.datamodule is not None and getattr(self.model, "bundle", None) is not None:
            # a CLIP adapter's checkpoint: refused before its results go anywhere
            check_checkpoint_run(ckpt, self.model, self.datamodule)
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            name = self.run_name()
            if name is not None:
                root = config.get("default_root_dir") or DEFAULT_RUNS_DIR
                kwargs["logger"] = TensorBoardLogger(
                    root, name=name[0], version=name[1], default_hp_metric=False
                )
                if self.subcommand == "fit":  # validate/test/predict read a run, never replace it
                    run_dir = Path(root) / name[0] / name[1]
                    check_same_setting(run_dir, run_identity(self.model, self.datamodule))
                    if not ckpt:  # fit --ckpt_path resumes this run (clearing deleted its checkpoint)
                        clear_run_dir(run_dir)
        return instantiate_checked_trainer(self, **progress.add_stage_progress_bar(config, kwargs))

    def after_fit(self) -> None:
        """Test the exported adapter (:meth:`test_exported`), then end with the run's closing block."""
        self.test_exported()
        self.print_closing_block()

    def print_closing_block(self) -> None:
        """Where the run went and its headline numbers (as ``evaluate.py`` ends), on rank 0, on stdout."""
        callback = self.trainer.checkpoint_callback
        run_dir = getattr(callback, "run_dir", None)
        if not self.trainer.is_global_zero or not callable(run_dir):
            return
        run_dir = Path(run_dir(self.trainer))
        metrics_path = run_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        files = [n + ("/" if (run_dir / n).is_dir() else "") for n in RUN_OUTPUTS if (run_dir / n).exists()]
        print(closing_block(run_dir, files, fit_numbers(run_dir, metrics)))

    def test_exported(self) -> None:
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
        check_loader_and_devices(cfg)

    def run_name(self) -> tuple[str, str] | None:
        method = getattr(self.model, "method", None)
        namer = getattr(self.datamodule, "run_name", None)
        if not method or not callable(namer):
            return None
        bundle = getattr(self.model, "bundle", None)
        if bundle is None:  # not a CLIP adapter (the LVLM LoRA names its own runs)
            return namer(method)
        # as evaluate.py names runs: model, weights (tag or file stem) and a precision other than fp32
        prec = bundle.precision if bundle.precision != "fp32" else None
        return namer(method, clip=join_name(bundle.model_name, short_weights(bundle.pretrained), prec))


# metrics.json keys naming the CLIP a run used (run_identity); a fit never replaces a run of other ones
SETTING_KEYS = ("model_name", "weights_id")


def check_same_setting(run_dir: Path, identity: dict) -> None:
    """Refuse to start a fit in ``run_dir`` when the run there used another CLIP model or weights (two
    checkpoint files of one name in different folders): clearing it would delete another setting's results."""
    path = run_dir / "metrics.json"
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return  # not a run this project wrote completely: clear_run_dir only removes its own outputs
    other = {k: earlier[k] for k in SETTING_KEYS if earlier.get(k) not in (None, identity.get(k))}
    if other and identity.get("weights_id") is not None:
        raise ValueError(
            f"{run_dir} holds the results of another CLIP ({', '.join(f'{k} {v!r}' for k, v in other.items())}), "
            f"and this run would replace them; set --trainer.default_root_dir to another folder (or move that run)"
        )


def fit_numbers(run_dir: Path, metrics: dict) -> list[tuple[str, str]]:
    """The headline of a fit from its ``metrics.json``: the adapter file, the epoch exported with its
    validation accuracy, the test accuracy; each beside zero-shot CLIP's."""

    def pct(key: str) -> str:
        return f"{100 * metrics[key]:.2f}%"

    def beside_zero_shot(key: str, zero_shot: str) -> str:
        return pct(key) + (f" (zero-shot {pct(zero_shot)})" if zero_shot in metrics else "")

    numbers = []
    if (run_dir / "adapter.safetensors").is_file():
        numbers.append(("adapter", str(run_dir / "adapter.safetensors")))
    if "epoch" in metrics:
        which = "last epoch" if metrics.get("selection") == "last" else "best epoch"
        numbers.append((which, str(metrics["epoch"])))
    if "val_acc" in metrics:
        numbers.append(("val acc", beside_zero_shot("val_acc", "zero_shot_val_acc")))
    if "test_acc" in metrics:
        size = f" on {metrics['test_size']} images" if "test_size" in metrics else ""
        numbers.append(("test acc", beside_zero_shot("test_acc", "zero_shot_test_acc") + size))
    return numbers


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
    argv = sys.argv[1:] if args is None else args
    setup_logging(verbosity_from_args(argv))
    refuse_lightning_optimizer_flags(argv, TRAIN_OPTIMIZER_FLAGS)
    subcommands = ("fit", "validate", "test", "predict")
    with expected_states_quiet(verbosity_from_args(argv)):
        return TrainCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={**parser_kwargs(), **{c: parser_kwargs() for c in subcommands}},
            args=args,
            auto_configure_optimizers=False,  # the modules' own configure_optimizers (see TRAIN_OPTIMIZER_FLAGS)
            # Lightning's table of submodules is a detail (--verbose, or trainer.enable_model_summary: true)
            trainer_defaults={"enable_model_summary": verbosity() == "verbose"},
        )


EVAL_TRAINER_DEFAULTS = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "accelerator": "auto",
    "devices": 1,
}


class EvaluateCLI(ProjectHelp):
    """``evaluate.py``'s command line: the CLIP module, the data module, the trainer, ``cascade.*`` options
    and, when given, the ``lvlm`` backend; :func:`cascadevlm.cascade.evaluate.evaluate` runs it."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output_dir", type=str, default="runs", help="parent of the run directory")
        parser.add_argument("--run_name", type=str | None, default=None, help="default: from the parameters")
        parser.add_argument("--cache_dir", type=str, default="artifacts/cache", help="feature cache")
        parser.add_argument("--answer_store", type=str | None, default="auto",
                            help="LVLM answers shared by all runs (auto: <cache_dir>/answers.sqlite; null: off)")  # fmt: skip
        parser.add_class_arguments(CascadeOptions, "cascade")
        parser.add_subclass_arguments(LVLMBackend, "lvlm", required=False, default=None)
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.templates", "model.templates", apply_on="instantiate")
        add_console_arguments(parser)

    def before_instantiate_classes(self) -> None:
        """``verbose: true`` / ``quiet: true`` may also come from a config file."""
        setup_logging(verbosity_of(self.config.get("verbose"), self.config.get("quiet")))
        check_loader_and_devices(self.config)

    def instantiate_trainer(self, **kwargs):
        """The trainer with the stage-named progress bar (Lightning's own, "Predicting", otherwise)."""
        config = self._get(self.config_init, "trainer", default={})
        return instantiate_checked_trainer(self, **progress.add_stage_progress_bar(config, kwargs))


EVALUATE_DESCRIPTION = (
    "Evaluate the CLIP -> entropy gate -> LVLM cascade: python evaluate.py --config configs/demo.yaml "
    "[--cascade.budget 0.2 ...] (later files and flags override earlier ones)"
)


def build_evaluate_cli(args: list[str] | None = None, cls: type[EvaluateCLI] = EvaluateCLI) -> EvaluateCLI:
    """Parse ``evaluate.py``'s command line into ``cls`` (errors raised as they are)."""
    register_classes(LVLM_CLASSES)
    # before the CLI builds anything: the models' and Lightning's set-up lines follow the console level
    setup_logging(verbosity_from_args(sys.argv[1:] if args is None else args))
    refuse_lightning_optimizer_flags(sys.argv[1:] if args is None else args, "evaluate.py trains nothing")
    if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = join_negative_values(sys.argv[1:])
    else:
        args = join_negative_values(list(args))
    with expected_states_quiet(verbosity_from_args(sys.argv[1:] if args is None else args)):
        return cls(
            ClipClassifier,
            CascadeDataModule,
            run=False,
            args=args,
            trainer_defaults=EVAL_TRAINER_DEFAULTS,
            save_config_callback=None,
            seed_everything_default=0,
            # entry points print parse errors as one line
            parser_kwargs={"exit_on_error": False, "description": EVALUATE_DESCRIPTION},
            auto_configure_optimizers=False,  # nothing is trained: no --optimizer / --lr_scheduler
        )


def run_evaluate(args: list[str] | None = None) -> dict | None:
    """Parse ``evaluate.py``'s command line and run the cascade (errors raised as they are)."""
    cli = build_evaluate_cli(args)
    with expected_states_quiet(verbosity_from_args(sys.argv[1:] if args is None else args)):
        return evaluate(cli)


class _ParseOnlyCLI(EvaluateCLI):
    """The evaluate command line parsed and checked, nothing built (no model, data or trainer)."""

    def instantiate_classes(self) -> None:
        pass


def evaluate_config(args: list[str]) -> dict:
    """The configuration ``evaluate.py args`` would run and record in its ``metrics.json`` (``config``),
    without building anything: a study compares it with a finished run's to skip that run."""
    return config_dict(build_evaluate_cli(args, _ParseOnlyCLI).config)


def split_datasets(args: list[str]) -> list[list[str]]:
    """``--data.dataset a,b`` (or ``--data.dataset=a,b``): one command line per dataset, in order;
    any other command line as it is."""
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag != "--data.dataset":
            continue
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        names = [n.strip() for n in value.split(",")]
        if len(names) < 2:
            return [args]
        if not all(names):
            raise ValueError(
                f"--data.dataset {value!r}: an empty dataset name in the list; give names as a,b"
            )
        if any(a.split("=", 1)[0] == "--run_name" for a in args):
            raise ValueError(
                "--run_name names one run: leave it out with several --data.dataset (each run is named from its dataset)"
            )
        rest = args[i + 1 :] if eq else args[i + 2 :]
        return [[*args[:i], f"--data.dataset={name}", *rest] for name in names]
    return [args]


@one_line_errors
def evaluate_main(args: list[str] | None = None) -> dict | list[dict | None] | None:
    """``evaluate.py``: the cascade evaluation (see :mod:`cascadevlm.cascade.evaluate`); errors as one line.
    ``--data.dataset a,b`` evaluates each dataset in turn in this process (a list of metrics)."""
    runs = split_datasets(sys.argv[1:] if args is None else list(args))
    if len(runs) == 1:
        return run_evaluate(args)
    return [run_evaluate(run) for run in runs]


COMMANDS = {"evaluate": evaluate_main, "train": train_main}


def main(argv: list[str] | None = None):
    """``python -m cascadevlm.cli evaluate ...`` / ``python -m cascadevlm.cli train fit ...``: the installed
    entry points (the same as the ``cascadevlm-evaluate`` / ``cascadevlm-train`` scripts)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m cascadevlm.cli {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        raise SystemExit(2)
    # sys.argv stays as it is: Lightning's DDP launcher starts the other ranks with the same command line.
    # LightningCLI then warns that it got both args and a command line; the entries keep that quiet.
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
