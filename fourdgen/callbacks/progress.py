"""Progress reporting that reads right in a log file as well as in a terminal.

Lightning's tqdm bar redraws one line with carriage returns: in a log file or a cluster job's stdout
nothing shows until the end, and a step-limited run (``max_steps`` set, ``max_epochs`` -1) reads
``Epoch 4`` with per-epoch totals that say nothing about the end of training. Here:

* :class:`LineProgress` prints one plain line every ``interval_s`` seconds (and at the first step and
  at the end): ``fit: step 450/2240 (20%) epoch 1 | train/loss 0.0312 | 3.1 it/s | eta 9m34s``.
* :class:`StepProgressBar` is the tqdm bar for terminals; when training is step-limited its main bar
  counts global steps out of ``max_steps`` instead of batches out of an epoch.
* :class:`FinalMetrics` prints the held-out metrics a run ended with, as one block at the end.

The CLI picks one of them by ``sys.stdout.isatty()`` unless the user configured a progress bar.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n


def _fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _fmt_value(v: Any) -> str:
    v = v.item() if hasattr(v, "item") else v  # one-element tensors (format_metrics skips the others)
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def format_metrics(metrics: Mapping[str, Any], prefix: str = "", sep: str = "  ") -> str:
    """``key value`` pairs of the scalar metrics whose key starts with ``prefix``, sorted by key."""
    items = []
    for k in sorted(metrics):
        v = metrics[k]
        if k.startswith(prefix) and (not hasattr(v, "numel") or v.numel() == 1):
            items.append(f"{k} {_fmt_value(v)}")
    return sep.join(items)


def step_total(trainer: L.Trainer) -> int | None:
    """The global step at which ``fit`` stops: ``max_steps``, or epochs x optimizer steps per epoch;
    None when unknown (an iterable dataset without ``max_steps``)."""
    total = trainer.estimated_stepping_batches
    return None if total is None or math.isinf(total) else int(total)


class LineProgress(ProgressBar):
    """A progress bar for non-terminals: one flushed line per ``interval_s`` seconds, never ``\\r``.

    Args:
        interval_s: seconds between lines (the first step and the end of each stage always print).
        stream: where lines go; ``sys.stdout`` at print time when None (so pytest's capture works).
    """

    def __init__(self, interval_s: float = 15.0, stream: TextIO | None = None):
        super().__init__()
        self.interval_s = interval_s
        self.stream = stream
        self._enabled = True
        self._last_print = -math.inf
        self._t0 = 0.0
        self._step0 = 0
        self._total: int | None = None
        self._epoch = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, **kwargs, file=self.stream or sys.stdout, flush=True)

    def _emit(self, line: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_print >= self.interval_s:
            self._last_print = now
            self.print(line)

    # -- fit --------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The rate counts from here: set-up time and the steps a resumed run already had are not in it.
        self._t0, self._step0 = time.monotonic(), trainer.global_step
        self._total = step_total(trainer)
        self._last_print = -math.inf  # the first step always prints

    def _train_line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        step, total = trainer.global_step, self._total
        head = f"fit: step {step}/{total} ({100 * step // max(total, 1)}%)" if total else f"fit: step {step}"
        parts = [f"{head} epoch {self._epoch}"]
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        if not metrics:  # the model logged nothing with prog_bar=True: show its train/* scalars
            metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        if text := format_metrics(dict(list(metrics.items())[:4])):
            parts.append(text)
        elapsed, done = time.monotonic() - self._t0, step - self._step0
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} it/s" if rate >= 1 else f"{1 / rate:.3g} s/it")
            if total:
                parts.append(f"eta {_fmt_duration(max(total - step, 0) / rate)}")
        return " | ".join(parts)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        self._epoch = trainer.current_epoch  # at on_train_end it already counts the epoch that max_steps cut
        self._emit(self._train_line(trainer, pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._emit(self._train_line(trainer, pl_module), force=True)

    # -- validate / test / predict: batch counts, at the same cadence ----------------------------------

    def _eval_line(self, trainer: L.Trainer, stage: str, batch_idx: int, total: int | float) -> str:
        where = f"fit (step {trainer.global_step}): validating" if trainer.state.fn == "fit" else stage
        return f"{where} batch {batch_idx + 1}/{total if math.isfinite(total) else '?'}"

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self.has_dataloader_changed(dataloader_idx)
            total = self.total_val_batches_current_dataloader
            self._emit(self._eval_line(trainer, "validate", batch_idx, total), force=batch_idx + 1 == total)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.has_dataloader_changed(dataloader_idx)
        total = self.total_test_batches_current_dataloader
        self._emit(self._eval_line(trainer, "test", batch_idx, total), force=batch_idx + 1 == total)

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.has_dataloader_changed(dataloader_idx)
        total = self.total_predict_batches_current_dataloader
        self._emit(self._eval_line(trainer, "predict", batch_idx, total), force=batch_idx + 1 == total)


class StepProgressBar(TQDMProgressBar):
    """tqdm bar whose main bar counts global steps out of ``max_steps`` when training is step-limited
    (``max_epochs`` -1), instead of restarting per epoch with a total that ignores where training ends."""

    def _step_limited(self) -> bool:
        return self.trainer.max_epochs == -1 and (self.trainer.max_steps or -1) > 0

    @property
    def total_train_steps(self) -> int | float:
        """The main bar's total: ``max_steps`` when step-limited, else the epoch's batches."""
        return self.trainer.max_steps if self._step_limited() else self.total_train_batches

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._step_limited():  # one bar for the whole run; epochs only change its description
            self.train_progress_bar.reset(total=trainer.max_steps)
            _update_n(self.train_progress_bar, trainer.global_step)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._step_limited():
            return super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"Step (epoch {trainer.current_epoch})")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._step_limited():
            return super().on_train_epoch_end(trainer, pl_module)
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # kept open: leave=True too

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._step_limited():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = trainer.global_step
        if self._should_update(n, self.train_progress_bar.total):
            _update_n(self.train_progress_bar, n)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class FinalMetrics(Callback):
    """At the end of ``fit`` the last validation's ``val/*`` metrics, at the end of ``test`` the ``test/*``
    ones, as one line on global rank 0: ``fourdgen: final held-out metrics (step 2240): val/psnr 24.31 ...``.
    Read from ``callback_metrics`` (the last logged value of each)."""

    def __init__(self) -> None:
        self._val_step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_step = trainer.global_step  # max_steps can stop training after the last validation

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, "val/", self._val_step)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, "test/", trainer.global_step)

    @staticmethod
    def _print(trainer: L.Trainer, prefix: str, step: int | None) -> None:
        text = format_metrics(trainer.callback_metrics, prefix)
        if not (text and trainer.is_global_zero):
            return
        when = f"step {step}"
        if step != trainer.global_step:
            when += f"; training ended at step {trainer.global_step}"
        print(f"fourdgen: final held-out metrics ({when}): {text}", flush=True)
