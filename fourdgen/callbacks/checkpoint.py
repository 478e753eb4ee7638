"""Lightning's ``ModelCheckpoint`` with two guarantees every fourdgen recipe relies on.

1. ``last.ckpt`` holds the final state. Lightning saves only at its interval
   (``every_n_train_steps``), so a run of 2240 steps saved every 500 ended with step 2000 in
   ``last.ckpt``; this one saves once more when ``fit`` ends.
2. A new run (no ``--ckpt_path``) does not replace the checkpoints of an earlier run in the same
   folder: it stops before training and says how to resume, unless ``--overwrite`` is given.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint

from fourdgen.callbacks.guard import GuardedOutput
from fourdgen.errors import OutputExistsError


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
