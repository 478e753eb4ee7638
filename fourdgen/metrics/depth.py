"""Depth metrics (AbsRel, delta < 1.25) with per-image median or least-squares alignment.

Inputs are depth maps ``[H, W]`` or ``[B, H, W]`` (any leading dims are flattened to B images).
Ground truth <= 0 or non-finite is invalid and ignored, as is anything outside ``mask``.
Metrics are computed per image and averaged over images with at least one valid pixel.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _prep(pred: Tensor, gt: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, torch.Size]:
    """Flatten to ``[B, P]`` (float64) and build the validity mask ``[B, P]``."""
    if pred.shape != gt.shape or pred.ndim < 2:
        raise ValueError(
            f"expected matching [..., H, W] depth maps, got {tuple(pred.shape)}, {tuple(gt.shape)}"
        )
    shape = pred.shape
    p = pred.reshape(-1, shape[-2] * shape[-1]).double()
    g = gt.reshape_as(p).double().to(p.device)
    valid = torch.isfinite(g) & (g > 0)
    if mask is not None:
        valid &= mask.expand(shape).reshape_as(p).to(device=p.device, dtype=torch.bool)
    return p, g, valid, shape


def _reduce(per_image: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """Average per-image values over images that have valid pixels (NaN if none have)."""
    if reduction == "none":
        return per_image
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    has = valid.any(-1)
    return per_image[has].mean() if has.any() else per_image.new_tensor(float("nan"))


def abs_rel(pred: Tensor, gt: Tensor, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Mean of ``|pred - gt| / gt`` over valid pixels. ``reduction="none"`` gives ``[B]``
    (NaN for images without valid pixels); ``"mean"`` a scalar. float64."""
    p, g, valid, _ = _prep(pred, gt, mask)
    err = torch.where(valid, (p - g).abs() / g.where(valid, 1.0), 0.0)
    per_image = err.sum(-1) / valid.sum(-1)
    return _reduce(per_image, valid, reduction)


def delta_acc(
    pred: Tensor, gt: Tensor, threshold: float = 1.25, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Fraction of valid pixels with ``max(pred/gt, gt/pred) < threshold`` (delta1 for 1.25).

    Non-positive predictions count as failures (a plain ratio of two negatives would pass).
    """
    p, g, valid, _ = _prep(pred, gt, mask)
    g_safe = g.where(valid, 1.0)
    p_safe = p.clamp_min(torch.finfo(p.dtype).tiny)
    ratio = torch.maximum(p_safe / g_safe, g_safe / p_safe)
    ok = valid & (ratio < threshold) & (p > 0)
    per_image = ok.sum(-1).double() / valid.sum(-1)
    return _reduce(per_image, valid, reduction)


def align_depth_median(pred: Tensor, gt: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scale each image of ``pred`` by ``median(gt) / median(pred)`` over its valid pixels.

    Returns the aligned prediction, same shape and dtype as ``pred`` (unchanged where an image
    has no valid pixels).
    """
    p, g, valid, shape = _prep(pred, gt, mask)
    nan = torch.full_like(p, float("nan"))
    med_p = torch.nanmedian(torch.where(valid, p, nan), dim=-1).values
    med_g = torch.nanmedian(torch.where(valid, g, nan), dim=-1).values
    scale = torch.nan_to_num(med_g / med_p, nan=1.0, posinf=1.0, neginf=1.0)
    return (p * scale[:, None]).reshape(shape).to(pred.dtype)


def align_depth_scale_shift(pred: Tensor, gt: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per image least-squares ``s * pred + b ~= gt`` over valid pixels (closed form, float64).

    Returns the aligned prediction, same shape and dtype as ``pred``. Images with fewer than
    two distinct valid predictions fall back to a pure shift (or identity if none are valid).
    """
    p, g, valid, shape = _prep(pred, gt, mask)
    w = valid.double()
    p0, g0 = torch.where(valid, p, 0.0), torch.where(valid, g, 0.0)
    n = w.sum(-1)
    n_safe = n.clamp_min(1)
    mp, mg = p0.sum(-1) / n_safe, g0.sum(-1) / n_safe
    # Centred sums keep the normal equations well conditioned for large depth offsets.
    dp, dg = (p0 - mp[:, None]) * w, (g0 - mg[:, None]) * w
    var = (dp * dp).sum(-1)
    cov = (dp * dg).sum(-1)
    degenerate = var <= 1e-12 * n_safe * mp.abs().clamp_min(1.0) ** 2
    s = torch.where(degenerate, torch.ones_like(var), cov / var.where(~degenerate, 1.0))
    b = torch.where(n > 0, mg - s * mp, torch.zeros_like(mg))
    return (p * s[:, None] + b[:, None]).reshape(shape).to(pred.dtype)


def depth_metrics(
    pred: Tensor,
    gt: Tensor,
    mask: Tensor | None = None,
    align: str = "median",
    per_image: bool = True,
) -> dict[str, float]:
    """``{"abs_rel", "delta1"}`` after alignment.

    Args:
        pred, gt: ``[H, W]`` or ``[B, H, W]`` depth.
        mask: optional boolean ``[..., H, W]`` (broadcast to ``pred``), True = evaluate.
        align: ``"median"`` (scale), ``"scale_shift"`` (least squares) or ``"none"``.
        per_image: align and score each image on its own (default). ``False`` aligns the whole
            batch with one scale (and shift) and pools its pixels, the video-depth protocol
            (e.g. MonST3R / CUT3R) when the batch is one sequence.
    """
    if not per_image:
        if mask is not None:
            mask = mask.expand(pred.shape).reshape(1, -1, pred.shape[-1])
        pred, gt = pred.reshape(1, -1, pred.shape[-1]), gt.reshape(1, -1, gt.shape[-1])
    if align == "median":
        pred = align_depth_median(pred, gt, mask)
    elif align == "scale_shift":
        pred = align_depth_scale_shift(pred, gt, mask)
    elif align != "none":
        raise ValueError(f"align must be 'median', 'scale_shift' or 'none', got {align!r}")
    return {"abs_rel": float(abs_rel(pred, gt, mask)), "delta1": float(delta_acc(pred, gt, 1.25, mask))}
