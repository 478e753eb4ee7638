"""DropGaussian (Park et al., CVPR 2025): random Gaussians left out of each training render.

With few cameras, 3DGS fits each training view with Gaussians that only line up from there; views
between the cameras then see them as floaters. Dropping a random share ``r`` of the Gaussians in
each training step, and raising the others' opacity by ``1 / (1 - r)`` so that the expected
coverage stays, makes every Gaussian matter to more renders (the paper's few-view benchmarks
gain over 3DGS; here: benchmarks/RESULTS.md, issue 17 fifth pass). Validation, test and export
render every Gaussian.
"""

from __future__ import annotations

import torch
from torch import Tensor

DROPPED_LOGIT = -30.0  # alpha 1e-13: below every rasterizer's cut-off


def dropped_logits(logits: Tensor, keep: Tensor, rate: float) -> Tensor:
    """Opacity ``logits [N]`` with the Gaussians where ``keep [N]`` (bool) is False left out and
    the others' opacity ``sigmoid(l) / (1 - rate)`` (clamped to ``[1e-6, 1 - 1e-6]``), as logits;
    differentiable in the kept ones."""
    # clamped on both sides: faded-out Gaussians have alpha 0, whose logit (and its gradient,
    # which where's backward multiplies by 0 for dropped ones) would be infinite
    alpha = (torch.sigmoid(logits) / (1.0 - rate)).clamp(1e-6, 1.0 - 1e-6)
    return torch.where(keep, torch.logit(alpha), torch.full_like(logits, DROPPED_LOGIT))


def keep_mask(num: int, rate: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """``[num]`` bool, each True with probability ``1 - rate`` (drawn on the CPU from ``generator``:
    a resumed fit drops the same Gaussians)."""
    return (torch.rand(num, generator=generator) >= rate).to(device, non_blocking=True)
