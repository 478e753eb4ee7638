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


def check_finite_grads(module: torch.nn.Module, step: int) -> None:
    """Stop on a non-finite gradient before the optimizer applies it (a finite loss can still
    back-propagate NaN, e.g. from a degenerate camera or splat in a renderer), naming the parameters."""
    grads = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
    if not grads:
        return
    finite = torch.stack([torch.isfinite(g).all() for _, g in grads])  # one host sync, not one each
    if bool(finite.all()):
        return
    bad = [n for (n, _), ok in zip(grads, finite.tolist(), strict=True) if not ok]
    raise FloatingPointError(
        f"non-finite gradients at global step {step} in {len(bad)} parameters ({bad[:4]}...): stopping "
        "before the optimizer step so the weights stay finite. Resume from the last checkpoint "
        "(--ckpt_path last) with a lower learning rate, or check the input data."
    )
