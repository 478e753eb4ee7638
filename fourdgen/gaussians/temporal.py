"""Time-localised opacity: each Gaussian is visible around its own time (4DGS, Yang et al. 2024;
Spacetime Gaussians' temporal radial basis).

A deformation field alone must carry a moving object's canonical Gaussians across the whole clip,
and rendering gradients only reach a Gaussian that still overlaps its target: large motion is
then learned slowly or not at all. Initialising Gaussians at every frame (from that frame's
depth) and fading each one in time, ``opacity(t) = sigmoid(logit) * exp(-((t - mu) / s)^2 / 2)``,
leaves the deformation only the motion between neighbouring frames, where gradients exist; a
Gaussian still visible at a neighbour frame must match there too, so the field learns real
motion instead of a cross-fade. Static Gaussians (``always``) do not fade.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def faded_logits(
    logits: Tensor, t: Tensor | float, t_mean: Tensor, t_log_scale: Tensor, always: Tensor | None = None
) -> Tensor:
    """Opacity logits ``[N]`` of ``sigmoid(logits) * temporal_weight`` at time ``t``.

    Computed in log space (``log p = logsigmoid(l) - q / 2``, ``logit = log p - log(1 - p)``) so
    that a Gaussian far from its time has a finite, very negative logit instead of ``logit(0)``.
    ``always [N]`` bool: Gaussians that keep ``logits`` unchanged (static ones).
    """
    q = ((t - t_mean) / t_log_scale.exp()) ** 2
    log_p = (F.logsigmoid(logits) - 0.5 * q).clamp_max(-1e-7)  # p < 1: log(1 - p) stays finite
    out = log_p - torch.log(-torch.expm1(log_p))
    return out if always is None else torch.where(always, logits, out)


def initial_log_scale(num_frames: int, width: float) -> float:
    """Log temporal std of ``width`` frame spacings for a clip of ``num_frames`` on [0, 1]."""
    return math.log(width / max(num_frames - 1, 1))
