"""Helpers shared by the stage modules."""

from __future__ import annotations

import torch
from torch import Tensor


def check_finite(value: Tensor | float, name: str, step: int) -> None:
    """Stop training on a NaN/inf loss *before* backward, so no weight is corrupted and the last
    checkpoint stays the one to resume from."""
    if isinstance(value, Tensor) and not torch.isfinite(value.detach()).all():
        bad = value.detach().float().flatten()[0].item()
        raise FloatingPointError(
            f"{name} is {bad} at global step {step}: stopping before the "
            "optimizer step so the weights stay finite. Resume from the last checkpoint (--ckpt_path last) "
            "with a lower learning rate, or check the input data."
        )
