"""Callbacks that write outputs refuse to replace what they should not.

A writer derives from :class:`GuardedOutput` and asks :meth:`GuardedOutput.may_write` before it
writes into a folder (see :func:`fourdgen.io.claim_output_dir` for the rules), then wraps the
writing in :meth:`GuardedOutput.writing`, which leaves the manifest that later runs check. The
CLI's ``--overwrite`` sets ``overwrite`` on every such callback, and nothing else does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from fourdgen.io import claim_output_dir, write_manifest


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


class GuardedOutput:
    """Mixin: ``overwrite`` allows replacing foreign files or a longer run's outputs."""

    overwrite: bool = False

    @property
    def writer_name(self) -> str:
        return type(self).__name__

    def may_write(self, trainer: Any, folder: str | Path, step: int | None = None) -> bool:
        """Whether this run may write into ``folder``.

        A debug run (``fast_dev_run``) never replaces existing outputs: it answers False with a
        note. Otherwise the folder must be claimable (``claim_output_dir``) or this raises
        :class:`~fourdgen.errors.OutputExistsError`.
        """
        folder = Path(folder)
        if getattr(trainer, "fast_dev_run", False) and not self.overwrite and _has_files(folder):
            rank_zero_info(f"fourdgen: debug run (fast_dev_run): {folder} is left as it is")
            return False
        claim_output_dir(folder, self.writer_name, step, self.overwrite)
        return True

    @contextlib.contextmanager
    def writing(self, folder: str | Path, step: int | None = None, **fields: Any) -> Iterator[Path]:
        """Mark ``folder`` as this writer's while it writes (``complete: false``), then complete."""
        folder = Path(folder)
        write_manifest(folder, self.writer_name, step=step, complete=False, **fields)
        yield folder
        write_manifest(folder, self.writer_name, step=step, complete=True, **fields)


class GuardedPredictionWriter(GuardedOutput, BasePredictionWriter):
    """A prediction writer (one sub-folder per clip under ``self.out_dir``) that claims ``out_dir``
    when prediction starts and marks it complete when it ends. Subclasses set ``self.out_dir``."""

    out_dir: Path

    def on_predict_start(self, trainer, pl_module) -> None:
        self._skip = not self.may_write(trainer, self.out_dir)
        if not self._skip and trainer.is_global_zero:
            write_manifest(self.out_dir, self.writer_name, step=None, complete=False)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not getattr(self, "_skip", False):
            super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_predict_end(self, trainer, pl_module) -> None:
        if not getattr(self, "_skip", True) and trainer.is_global_zero:
            write_manifest(self.out_dir, self.writer_name, step=None, complete=True)
