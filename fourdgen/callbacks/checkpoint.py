"""Lightning's ``ModelCheckpoint`` with two guarantees every fourdgen recipe relies on.

1. ``last.ckpt`` holds the final state. Lightning saves only at its interval
   (``every_n_train_steps``), so a run of 2240 steps saved every 500 ended with step 2000 in
   ``last.ckpt``; this one saves once more when ``fit`` ends.
2. A new run (no ``--ckpt_path``) does not replace the checkpoints of an earlier run in the same
   folder: it stops before training and says how to resume, unless ``--overwrite`` is given.
3. A checkpoint file is whole or absent: each is written as ``.<name>.partial`` in the same folder
   and renamed into place (Lightning's own save writes through a temporary file in the system's
   temp dir and moves it, which is a copy, not a rename, when that is another filesystem), and a
   model with non-finite trainable weights is never saved: the last good checkpoint stays.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from weakref import proxy

import torch
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint

from fourdgen.callbacks.guard import GuardedOutput
from fourdgen.errors import OutputExistsError
from fourdgen.io import replace_path


def weights_finite(module: torch.nn.Module) -> bool:
    """Whether every trainable weight of ``module`` is finite (this rank's shards under FSDP2)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return True
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    return bool(torch.stack([torch.isfinite(p.detach()).all() for p in local]).all())


class ModelCheckpoint(GuardedOutput, _LightningModelCheckpoint):
    """Drop-in for ``lightning.pytorch.callbacks.ModelCheckpoint`` (same arguments)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        # Here, not in setup: Lightning sets trainer.ckpt_path after the setup hooks.
        super().on_fit_start(trainer, pl_module)
        if trainer.ckpt_path is not None or trainer.fast_dev_run or self.overwrite:
            return
        found = sorted(Path(self.dirpath).glob("*.ckpt")) if self.dirpath else []
        if found:
            last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            resume = last if last.exists() else found[-1]
            raise OutputExistsError(
                f"{self.dirpath}: holds checkpoints of an earlier run ({', '.join(p.name for p in found[:3])}"
                f"{', ...' if len(found) > 3 else ''}). Resume it with --ckpt_path {resume}, start over "
                "with --overwrite (replaces them), or choose another folder (trainer.default_root_dir or "
                "the checkpoint callback's dirpath)."
            )

    def on_train_end(self, trainer, pl_module) -> None:
        # Replaces Lightning's, which saves only when nothing was saved, and then even under
        # fast_dev_run (a debug run left last-v1.ckpt beside a finished run's last.ckpt).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        # Lightning's bookkeeping after its own trainer.save_checkpoint, around a write that is atomic.
        ok = trainer.strategy.reduce_boolean_decision(weights_finite(trainer.lightning_module), all=True)
        if not ok:
            raise FloatingPointError(
                f"non-finite trainable weights at global step {trainer.global_step}: not saving "
                f"{filepath}, so the last checkpoint stays the one to resume from (--ckpt_path)"
            )
        final = Path(filepath)
        partial = final.with_name(f".{final.name}.partial")
        if trainer.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(
                missing_ok=True
            )
        trainer.strategy.barrier("fourdgen.checkpoint.partial")
        trainer.save_checkpoint(str(partial), self.save_weights_only)  # ends with a barrier
        if trainer.is_global_zero:
            replace_path(partial, final)
        trainer.strategy.barrier("fourdgen.checkpoint.replace")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
