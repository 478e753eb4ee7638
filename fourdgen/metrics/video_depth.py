"""Video depth protocol (MonST3R / CUT3R, used by One4D table 3): one alignment per sequence.

A sequence's valid pixels are pooled over all its frames: ground truth finite, in ``(0, max_depth)``
and the prediction positive. One scale (``"scale"``: median ratio, torch's lower median as in those
scripts), or scale and shift
(``"scale_shift"``: least squares; ``"scale_shift_l1"``: least absolute deviations, MonST3R's
``align_with_lad2``, solved by iteratively reweighted least squares instead of Adam) is fitted on
them, the aligned prediction is clipped at ``max_depth``, and AbsRel / delta < 1.25 are computed
over the pooled pixels. Sequences are averaged weighted by their valid pixels
(``np.average(..., weights=valid_pixels)`` in those scripts). The usual caps: 70 for Sintel and Bonn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fourdgen.metrics.depth import abs_rel, delta_acc

ALIGNMENTS = ("scale", "scale_shift", "scale_shift_l1", "none")


def fit_scale_shift_l1(pred: Tensor, gt: Tensor, iters: int = 100, eps: float = 1e-8) -> tuple[float, float]:
    """``(s, t)`` minimising ``sum |s * pred + t - gt|`` over 1-D ``pred``, ``gt`` (float64 IRLS)."""
    p, g = pred.double(), gt.double()
    A = torch.stack([p, torch.ones_like(p)], dim=-1)  # [N, 2]
    w = torch.ones_like(p)
    x = torch.zeros(2, dtype=p.dtype)
    for _ in range(iters):
        Aw = A * w[:, None]
        x_new = torch.linalg.solve(A.T @ Aw + eps * torch.eye(2, dtype=p.dtype), Aw.T @ g)
        if torch.allclose(x_new, x, rtol=1e-12, atol=1e-12):
            break
        x = x_new
        w = 1.0 / (A @ x - g).abs().clamp_min(1e-9)  # weights 1/|r| turn least squares into L1
    return float(x[0]), float(x[1])


def video_depth_metrics(
    pred: Tensor, gt: Tensor, align: str = "scale", max_depth: float | None = 70.0, mask: Tensor | None = None
) -> dict[str, float]:
    """``{"abs_rel", "delta1", "valid_pixels"}`` of one sequence, ``pred``/``gt`` ``[T, H, W]``.

    ``mask`` (bool, broadcast to ``[T, H, W]``) restricts the evaluated pixels further. With no valid
    pixel the metrics are NaN and ``valid_pixels`` 0.
    """
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"expected matching [T, H, W] depth, got {tuple(pred.shape)}, {tuple(gt.shape)}")
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    p, g = pred.double().flatten(), gt.double().flatten()
    valid = torch.isfinite(g) & (g > 0) & torch.isfinite(p) & (p > 0)
    if max_depth is not None:
        valid &= g < max_depth
    if mask is not None:
        valid &= mask.expand(pred.shape).flatten().bool()
    n = int(valid.sum())
    if n == 0:
        return {"abs_rel": float("nan"), "delta1": float("nan"), "valid_pixels": 0}
    p, g = p[valid], g[valid]
    if align == "scale":
        p = p * (g.median() / p.median())
    elif align == "scale_shift":
        A = torch.stack([p, torch.ones_like(p)], dim=-1)
        s, t = torch.linalg.lstsq(A, g[:, None]).solution[:, 0]
        p = s * p + t
    elif align == "scale_shift_l1":
        s, t = fit_scale_shift_l1(p, g)
        p = s * p + t
    if max_depth is not None:
        p = p.clamp(max=max_depth)
    p, g = p[None, None], g[None, None]  # one image of all pooled pixels
    return {"abs_rel": float(abs_rel(p, g)), "delta1": float(delta_acc(p, g)), "valid_pixels": n}


def average_sequences(results: list[dict[str, float]]) -> dict[str, float]:
    """Average per-sequence metrics weighted by ``valid_pixels`` (sequences without any are skipped)."""
    total = sum(r["valid_pixels"] for r in results)
    if total == 0:
        return {"abs_rel": float("nan"), "delta1": float("nan"), "valid_pixels": 0}
    out = {
        k: sum(r[k] * r["valid_pixels"] for r in results if r["valid_pixels"]) / total
        for k in ("abs_rel", "delta1")
    }
    return {**out, "valid_pixels": total}
