"""Progress bars named by the cascade's stages, with images/s (and the LVLM stage's answer counts).

Lightning's own bar calls every ``trainer.predict`` "Predicting" and counts batches. The trainers of
``evaluate.py`` and ``train.py`` get a :class:`StageProgressBar` instead (Rich, on stderr, so stdout keeps
only the results; one line per bar within the terminal's width); :func:`stage` names the bar for one ``trainer.predict`` call and logs a one-line summary of the
stage when it ends, also when no bar is shown (``--quiet``, ``enable_progress_bar: false``, a log file).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import CustomBarColumn, MetricsTextColumn
from rich.progress import ProgressColumn
from rich.text import Text

from cascadevlm.logs import get_logger, verbosity

log = get_logger(__name__)


def batch_size_of(batch: Any) -> int:
    """Images in a batch: a list of samples (the LVLM stage), a tensor, or a dict/tuple of tensors."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values()))) if batch else 0
    if isinstance(batch, tuple) and batch:
        return batch_size_of(batch[0])
    if isinstance(batch, list):
        return len(batch)
    return 1


class LVLMCounts:
    """The LVLM stage's counts: answered before (parts of an earlier attempt) or from the backend's cache,
    asked (requests the backend sent), failed (answers that are failed calls, asked again next run)."""

    def __init__(self, backend: Any, answered_before: int = 0) -> None:
        self.backend = backend
        self.answered_before = answered_before
        self._calls0 = int(getattr(backend, "calls", 0) or 0)
        self.images = 0
        self.failed = 0

    @property
    def asked(self) -> int:
        return int(getattr(self.backend, "calls", 0) or 0) - self._calls0

    @property
    def cached(self) -> int:
        # images answered in this stage without a request came from the backend's answer cache
        return self.answered_before + max(0, self.images - self.asked)

    def update(self, outputs: Any, images: int) -> None:
        from cascadevlm.lvlm.base import needs_retry

        self.images += images
        self.failed += sum(bool(needs_retry(getattr(o, "fallback", None))) for o in outputs or ())

    def text(self) -> str:
        return f"cached {self.cached}, asked {self.asked}, failed {self.failed}"


def _cropped(text: Text) -> Text:
    """One line, cut with an ellipsis where the terminal is narrower (Rich would wrap it: a ladder)."""
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


class _Info(ProgressColumn):
    """``200 img, 13.6/s`` (and the LVLM counts) on a stage's bar; ``5/20 · 3.10it/s`` (batches) on
    Lightning's own bars.

    The one wrappable column of the bar: when a line does not fit, Rich narrows this one and the text is
    cut, so the name, the bar and the times stay whole."""

    def render(self, task) -> Text:
        images = task.fields.get("images")
        if images is None:  # a bar of Lightning's own loops (training epochs)
            total = int(task.total) if task.total is not None and task.total != float("inf") else "--"
            return _cropped(
                Text(f"{int(task.completed)}/{total} · {task.speed or 0.0:.2f}it/s", style="grey70")
            )
        elapsed = task.finished_time if task.finished else task.elapsed
        rate = images / elapsed if elapsed else 0.0
        note = task.fields.get("note")
        # 2000 img, 6.4/s · cached 200, asked 1800, failed 0: the LVLM stage's line within 80 columns
        text = f"{images} img, {rate:.{0 if rate >= 100 else 1}f}/s" + (f" · {note}" if note else "")
        return _cropped(Text(text, style="grey70"))


class _Time(ProgressColumn):
    """Elapsed, and while running the time left: ``0:01:05<0:02:10`` (``0:03:15`` once done)."""

    max_refresh = 0.5  # as Lightning's time column: no jitter

    def render(self, task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        shown = "-:--:--" if elapsed is None else str(timedelta(seconds=int(elapsed)))
        if not task.finished and task.time_remaining is not None:
            shown += f"<{timedelta(seconds=int(task.time_remaining))}"
        return Text(shown, style="grey70")


class _CroppedMetrics(MetricsTextColumn):
    """Lightning's metrics column (``val/acc: 0.661``), cut rather than wrapped when too long."""

    def render(self, task) -> Text:
        return _cropped(super().render(task))


class StageProgressBar(RichProgressBar):
    """The project's Rich bar on stderr, one line per bar within the terminal's width (``COLUMNS``, the
    terminal, or Rich's 80 for a file): a prediction bar carries the stage's name and images/s; the
    training bars the epoch, batches and metrics."""

    BAR_WIDTH = 8  # narrow, so a stage's name, times and counts fit 80 columns

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("console_kwargs", {"stderr": True})
        super().__init__(**kwargs)
        self.stage_name: str | None = None
        self.counts: LVLMCounts | None = None
        self._images = 0

    @property
    def predict_description(self) -> str:
        return self.stage_name or super().predict_description

    def configure_columns(self, trainer) -> list:
        desc = super().configure_columns(trainer)[0]
        bar = CustomBarColumn(
            bar_width=self.BAR_WIDTH,
            complete_style=self.theme.progress_bar,
            finished_style=self.theme.progress_bar_finished,
            pulse_style=self.theme.progress_bar_pulse,
        )
        return [desc, bar, _Time(), _Info()]

    def _init_progress(self, trainer) -> None:
        super()._init_progress(trainer)
        if isinstance(self._metric_component, MetricsTextColumn):
            self._metric_component.__class__ = _CroppedMetrics

    def get_metrics(self, trainer, pl_module) -> dict:
        """The logged metrics without ``v_num`` (the run's version, already in its directory's name)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_predict_start(self, trainer, pl_module) -> None:
        self._images = 0
        super().on_predict_start(trainer, pl_module)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.is_disabled or self.predict_progress_bar_id is None or self.progress is None:
            return
        self._images += batch_size_of(batch)
        fields = {"images": self._images}
        if self.counts is not None:
            fields["note"] = self.counts.text()
        self.progress.update(self.predict_progress_bar_id, **fields)
        self.refresh()


def add_stage_progress_bar(trainer_config: dict, kwargs: dict) -> dict:
    """``kwargs`` for ``LightningCLI.instantiate_trainer`` with a :class:`StageProgressBar` added when the
    trainer would show Lightning's default bar (a configured bar or ``enable_progress_bar: false`` is
    kept); under ``--quiet`` no bar at all."""
    if trainer_config.get("enable_progress_bar") is False or "callbacks" in kwargs:
        return kwargs
    callbacks = trainer_config.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if any(isinstance(c, ProgressBar) for c in callbacks):
        return kwargs
    if verbosity() == "quiet":
        return {**kwargs, "enable_progress_bar": False}
    return {**kwargs, "callbacks": [*callbacks, StageProgressBar()]}


@contextmanager
def stage(trainer: Any, name: str, counts: LVLMCounts | None = None, show_bar: bool = True) -> Iterator[None]:
    """Name the progress bar ``name`` for the ``trainer.predict`` calls inside, and log when done:
    ``CLIP stage: test: 150 images in 2.0 s (75.0 images/s)`` (with the LVLM counts when given).

    ``show_bar=False``: no bar for this stage (a backend that draws its own, such as the API backend's
    per-image bar; two live displays on one terminal garble each other)."""
    bar = getattr(trainer, "progress_bar_callback", None)
    named = isinstance(bar, StageProgressBar) and not bar.is_disabled
    hidden = named and not show_bar
    if hidden:
        bar.disable()
        named = False
    if named:
        bar.stage_name, bar.counts = name, counts
    counter = _CountingCallback(counts)
    trainer.callbacks.insert(0, counter)  # first, so the bar shows this batch's counts
    started = time.perf_counter()
    try:
        yield
    finally:
        if named:
            bar.stage_name, bar.counts = None, None
        if hidden:
            bar.enable()
        trainer.callbacks.remove(counter)
    seconds = time.perf_counter() - started
    images = counter.images
    rate = f" ({images / seconds:.1f} images/s)" if images and seconds > 0 else ""
    extra = f"; {counts.text()}" if counts is not None else ""
    # the bar already shows this on the console; the line is for logs without one
    log.log(
        logging.DEBUG if named else logging.INFO, f"{name}: {images} images in {seconds:.1f} s{rate}{extra}"
    )


class _CountingCallback(Callback):
    """Counts this rank's images (and the LVLM answers) batch by batch."""

    def __init__(self, counts: LVLMCounts | None) -> None:
        self.counts = counts
        self.images = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        n = batch_size_of(batch)
        self.images += n
        if self.counts is not None:
            self.counts.update(outputs, n)
