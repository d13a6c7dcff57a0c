"""The console: the project's status through :mod:`logging`, third-party noise kept out unless asked for.

Every entry point calls :func:`setup_logging` once its ``--verbose`` / ``--quiet`` are known:

- ``quiet``: warnings and errors only (the result tables on stdout stay);
- ``normal`` (default): the project's status lines (``cascadevlm.*`` at INFO); Lightning's device lines and
  tips, deprecation warnings, Hugging Face's loading/saving bars and open_clip's random-init warning
  (the project notes random weights itself) are kept out;
- ``verbose``: all of those back, and the project's DEBUG lines.

In DDP only rank 0 writes INFO lines; warnings and errors come from every rank.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

Verbosity = Literal["quiet", "normal", "verbose"]

PROJECT_LOGGER = "cascadevlm"
# Lightning's own loggers: device lines ("GPU available"), "Seed set to", the cloud-logging tip.
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")
DDP_MEMBERSHIP_LOGGER = "lightning.fabric.utilities.distributed"
# Messages that mislead or only advertise, kept out of the default console.
NOISE_MESSAGES = (
    "No pretrained weights loaded",  # open_clip, also for a model whose weights are loaded right after
    "Tip: For seamless cloud logging",  # Lightning's litlogger advertisement
)
NOISE_WARNINGS = (
    r".*LeafSpec.*",  # torch pytree deprecation reached through Lightning
    r".*does not have many workers.*",  # Lightning's hint; the project's loaders choose their workers
)

# Lightning's warnings about states the project's entry points choose on purpose, kept out of their
# default console (shown under --verbose): args= given with a command line (the adapter sweep calls
# train.py's entry in-process; ``python -m cascadevlm.cli`` keeps sys.argv for DDP's launcher), a frozen
# CLIP left in eval mode under a trained adapter, Tip-Adapter's fit without an optimiser.
EXPECTED_STATES = (
    r"LightningCLI's args parameter is intended to run from within Python",
    r"Found \d+ module\(s\) in eval mode",
    r"`LightningModule.configure_optimizers` returned `None`",
)

_state: dict = {"verbosity": "normal"}


def verbosity() -> Verbosity:
    """The console level :func:`setup_logging` last set."""
    return _state["verbosity"]


def get_logger(name: str) -> logging.Logger:
    """The logger of a project module (``__name__``); its records reach the project's handler."""
    return logging.getLogger(name)


def _rank() -> int:
    try:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        return int(getattr(rank_zero_only, "rank", 0) or 0)
    except ImportError:  # pragma: no cover - lightning is a dependency
        return 0


class RankZeroInfo(logging.Filter):
    """INFO and below only from rank 0 (Lightning's rank, set when the strategy starts)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _rank() == 0


class DropNoise(logging.Filter):
    """Drops the records whose message starts with one of :data:`NOISE_MESSAGES` (default console only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _state["verbosity"] == "verbose":
            return True
        msg = record.getMessage()
        return not any(n in msg for n in NOISE_MESSAGES)


class StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` at each record (so a redirected or captured stderr gets it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class ConsoleFormatter(logging.Formatter):
    """Status lines as they are; warnings and errors marked; the logger's name added under ``--verbose``."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if _state["verbosity"] == "verbose":
            msg = f"[{record.name}] {msg}"
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        return msg


def verbosity_from_args(args: Sequence[str] | None) -> Verbosity:
    """``--verbose`` / ``--quiet`` (also ``=true`` or ``true`` after it) from a command line before it is parsed."""
    args = list(args or ())
    chosen: Verbosity = "normal"
    for i, a in enumerate(args):
        name, eq, value = a.partition("=")
        if not eq and i + 1 < len(args) and args[i + 1].lower() in ("true", "false"):
            value = args[i + 1]
        if name in ("--verbose", "--quiet") and value.lower() not in ("false", "0", "no"):
            chosen = "verbose" if name == "--verbose" else "quiet"
    return chosen


@contextmanager
def expected_states_quiet(level: Verbosity) -> Iterator[None]:
    """Inside, Lightning's :data:`EXPECTED_STATES` warnings are not shown unless ``level`` is verbose;
    scoped to an entry point's run (the filters are restored on exit, as any set inside)."""
    with warnings.catch_warnings():
        if level != "verbose":
            for pattern in EXPECTED_STATES:
                warnings.filterwarnings("ignore", message=pattern)
        yield


def verbosity_of(verbose: bool = False, quiet: bool = False) -> Verbosity:
    if verbose and quiet:
        raise ValueError("--verbose and --quiet contradict each other: give one of them")
    return "verbose" if verbose else "quiet" if quiet else "normal"


def add_console_arguments(parser, verbose: bool = True) -> None:
    """``--verbose`` / ``--quiet`` on an argparse or jsonargparse parser (``verbose=False``: ``--quiet`` only,
    for a parser whose ``--verbose`` is someone else's, such as ``train.py test``)."""
    if verbose:
        parser.add_argument(
            "--verbose", action="store_true", help="details: third-party logs, warnings, DEBUG lines"
        )
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only (result tables stay)")


def setup_logging(level: Verbosity = "normal") -> None:
    """Configure the console for ``level`` (idempotent: a second call replaces the first's settings)."""
    if level not in ("quiet", "normal", "verbose"):
        raise ValueError(f"console level must be quiet, normal or verbose, got {level!r}")
    _state["verbosity"] = level
    # One handler, on the root logger: the project's lines and third-party warnings alike (a root logger
    # without handlers would be given one by the first logging.warning() call, doubling every line).
    root = logging.getLogger()
    # ours from an earlier call, and the stderr handler logging.basicConfig() gives a root logger when a
    # module-level logging.info() runs first (it printed every line twice as "INFO:name:message")
    for h in [
        h
        for h in root.handlers
        if isinstance(h, StderrHandler) or (type(h) is logging.StreamHandler and h.stream is sys.stderr)
    ]:
        root.removeHandler(h)
    handler = StderrHandler()
    handler.setFormatter(ConsoleFormatter("%(message)s"))
    handler.addFilter(RankZeroInfo())
    handler.addFilter(DropNoise())
    root.addHandler(handler)
    project = logging.getLogger(PROJECT_LOGGER)
    project.setLevel({"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}[level])

    third_party = logging.INFO if level == "verbose" else logging.WARNING
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(third_party)
    # DDP's "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2", one per rank: shows every rank joined
    logging.getLogger(DDP_MEMBERSHIP_LOGGER).setLevel(logging.WARNING if level == "quiet" else logging.INFO)
    root.setLevel(third_party)
    if not any(isinstance(f, DropNoise) for f in root.filters):
        root.addFilter(DropNoise())  # open_clip logs through the root logger
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in lg.filters):
            lg.addFilter(DropNoise())
    _quiet_warnings(level)
    _hugging_face_bars(level == "verbose")


def _quiet_warnings(level: Verbosity) -> None:
    if level == "verbose":
        warnings.filterwarnings("default", category=DeprecationWarning)
        return
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def _hugging_face_bars(on: bool) -> None:
    """Hugging Face's weight-loading and shard-writing bars: only under ``--verbose``.

    A library not imported yet reads the environment when it is (and so do DDP ranks and subprocesses);
    one already imported is switched directly. Nothing is imported here (transformers takes seconds).
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0" if on else "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "0" if on else "1"
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None:
        hub.enable_progress_bars() if on else hub.disable_progress_bars()
    tl = sys.modules.get("transformers.utils.logging")
    if tl is not None:
        tl.enable_progress_bar() if on else tl.disable_progress_bar()
    ds = sys.modules.get("datasets")
    if ds is not None and hasattr(ds, "disable_progress_bars"):
        ds.enable_progress_bars() if on else ds.disable_progress_bars()
