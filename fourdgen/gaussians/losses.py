"""Training losses of a Gaussian fit: 3DGS's photometric loss and the HexPlane regularisers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure


@dataclass
class PhotometricLoss:
    """``loss = (1 - lambda) l1 + lambda dssim``, and its terms (scalar tensors)."""

    loss: Tensor
    l1: Tensor
    dssim: Tensor


def photometric_loss(
    preds: Sequence[Tensor], targets: Sequence[Tensor], ssim_weight: float
) -> PhotometricLoss:
    """3DGS's ``(1 - lambda) L1 + lambda (1 - SSIM)`` of frames rendered one at a time.

    Args:
        preds / targets: one ``[1, 3, H, W]`` image in ``[0, 1]`` per frame (a render each, so the
            frames may differ in size). L1 (mean absolute error of each frame) and SSIM
            (Gaussian window 11, sigma 1.5, data range 1) are averaged over the frames.
        ssim_weight: ``lambda`` (3DGS: 0.2).

    Returns ``loss``, ``l1`` and ``dssim = 1 - SSIM`` (differentiable w.r.t. ``preds``).
    """
    if len(preds) != len(targets) or not preds:
        raise ValueError(f"photometric_loss: {len(preds)} preds and {len(targets)} targets (need >= 1 each)")
    n = len(preds)
    l1 = ssim = 0.0
    for pred, target in zip(preds, targets, strict=True):
        l1 = l1 + (pred - target).abs().mean() / n
        ssim = ssim + structural_similarity_index_measure(pred, target, data_range=1.0) / n
    loss = (1 - ssim_weight) * l1 + ssim_weight * (1 - ssim)
    return PhotometricLoss(loss=loss, l1=l1, dssim=1 - ssim)


def inverse_depth_l1(preds: Sequence[Tensor], targets: Sequence[Tensor], min_depth: float = 1e-3) -> Tensor:
    """Mean ``|1 / pred - 1 / target|`` over the pixels whose ``target > 0`` (0 = unknown), averaged
    over the frames: ``preds`` / ``targets`` one ``[H, W]`` z-depth each (rendered expected depth /
    the scene's or an aligned estimate). Inverse depth, as sparse-view depth priors use it (DNGaussian,
    FSGS): far background (sky, dome) counts little, and the floor at grazing angles a lot. Pixels
    the render leaves empty (``pred == 0``: no Gaussian there) do not count either: no gradient reaches
    them, and at 1 / ``min_depth`` each they made the logged loss jump 1000-fold over a few holes
    (issue 17, eighth pass). A frame without known pixels adds 0."""
    total = 0.0
    for pred, target in zip(preds, targets, strict=True):
        known = (target > 0) & (pred > 0)
        diff = (1 / pred.clamp_min(min_depth) - 1 / target.clamp_min(min_depth)).abs()
        total = total + (diff * known).sum() / known.sum().clamp_min(1)
    return total / max(len(preds), 1)


def add_hexplane_regularization(
    loss: Tensor, reg: Mapping[str, Tensor], tv: float, time_smooth: float, time_l1: float
) -> Tensor:
    """``loss + tv * reg["tv"] + time_smooth * reg["time_smooth"] + time_l1 * reg["time_l1"]``
    (summed left to right), with ``reg`` a HexPlane's regularisers (scalar tensors, see
    ``DeformationField.regularization``): total variation of the planes, smoothness and L1 of
    their time axes."""
    return loss + tv * reg["tv"] + time_smooth * reg["time_smooth"] + time_l1 * reg["time_l1"]
