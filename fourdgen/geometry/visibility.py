"""Which pixels of a view some other camera sees: coverage of held-out views by training views.

A novel view's error splits into what the training cameras saw (reconstruction) and what none saw
(generation, e.g. flow-matching distillation's job); evaluations report both. Exact geometry comes
from synthetic scenes (:mod:`fourdgen.data.synthetic`); cameras follow :mod:`.cameras`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .projection import project


def covered_pixels(
    xyz: Tensor, K: Tensor, w2c: Tensor, depth: Tensor, rel_tol: float = 0.02, margin: float = 0.0
) -> Tensor:
    """Pixels of a view whose surface point some camera sees at the same time, unoccluded.

    Args:
        xyz: ``[T, H, W, 3]`` world points of the view's pixels (its exact geometry).
        K: ``[V, 3, 3]`` intrinsics of the other cameras.
        w2c: ``[V, T, 4, 4]`` their world-to-camera transforms.
        depth: ``[V, T, H', W']`` their z-depth (0 = unknown: nothing is seen there), the occlusion
            test: a point is seen when it lands inside the image, in front of the camera, and its
            depth is within ``rel_tol`` (relative) of the depth that camera sees at that pixel.
        margin: pixels of border excluded (a point landing there counts as unseen).

    Returns:
        ``[T, H, W]`` bool.
    """
    T, H, W, _ = xyz.shape
    V, _, Hc, Wc = depth.shape
    pts = xyz.reshape(T, -1, 3)
    seen = torch.zeros(T, H * W, dtype=torch.bool, device=xyz.device)
    for v in range(V):
        uv, z = project(pts, K[v].expand(T, 3, 3), w2c[v])  # [T, N, 2], [T, N]
        col, row = uv[..., 0].floor().long(), uv[..., 1].floor().long()
        inside = (z > 0) & (col >= margin) & (col < Wc - margin) & (row >= margin) & (row < Hc - margin)
        idx = row.clamp(0, Hc - 1) * Wc + col.clamp(0, Wc - 1)
        d = torch.gather(depth[v].reshape(T, -1), 1, idx)
        seen |= inside & (d > 0) & ((z - d).abs() <= rel_tol * d)
    return seen.reshape(T, H, W)
