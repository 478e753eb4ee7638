"""Exports the trained adapter of the video diffusion stage in diffusers' LoRA format.

Writes ``out_dir/step_XXXXXXX/`` every ``every_n_steps`` and ``out_dir/final/`` at the end of fit:
``pytorch_lora_weights.safetensors`` (loads into a stock diffusers Wan model or pipeline) and
``fourdgen_extra.safetensors`` (domain embeddings and other new trained tensors); for One4D's
decoupled LoRA one adapter folder per branch (``rgb/``, ``xyz/``) and the control links in
``fourdgen_extra.safetensors``. Only rank 0 writes; under FSDP every rank gathers the shards first.
``out_dir`` is guarded (:class:`~fourdgen.callbacks.guard.GuardedOutput`): checked before training,
and never filled over another writer's files or a longer run's export without ``--overwrite``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from fourdgen.callbacks.guard import GuardedOutput
from fourdgen.io import write_manifest


class LoraExport(GuardedOutput, L.Callback):
    """Args: ``out_dir`` (``step_XXXXXXX/`` and ``final/`` under it), ``every_n_steps`` (0: final only)."""

    def __init__(self, out_dir: str = "outputs/video/lora", every_n_steps: int = 0):
        self.out_dir, self.every_n_steps = Path(out_dir), every_n_steps
        self._enabled = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before training: say now what the end of the run would refuse
            planned = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            self._enabled = self.may_write(trainer, self.out_dir, planned)

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        if pl_module.transformer is None or not self._enabled:
            return
        if trainer.is_global_zero:
            self.may_write(trainer, self.out_dir, trainer.global_step)
        # The stage's adapter knows its format. Every rank gathers (FSDP shards), rank 0 writes;
        # full fine-tuning exports nothing (the Lightning checkpoint holds the weights).
        if not pl_module.export_adapter(self.out_dir / name, write=trainer.is_global_zero):
            return
        if trainer.is_global_zero:
            write_manifest(self.out_dir, self.writer_name, step=trainer.global_step, latest=name)
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._export(trainer, pl_module, f"step_{step:07d}")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module, "final")
