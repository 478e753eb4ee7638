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


def static_points(
    points: Tensor,
    K: Tensor,
    w2c: Tensor,
    depth: Tensor,
    rgb: Tensor,
    rel_tol: float = 0.02,
    color_tol: float = 0.12,
) -> Tensor:
    """Which surface points stay put over a clip: free-space carving plus photo-consistency.

    A point is static when no camera, at any time, sees past it (a depth beyond it at the pixel it
    projects to means it is gone: it moved), and each camera sees the same colour there at every
    time it sees the point (depth within ``rel_tol``; colours within ``color_tol`` per channel: a
    spinning textured ball keeps its geometry, not its texture). Colours are compared within a
    camera over time, not across cameras: at low resolution two views' pixels average different
    footprints of a texture. Occlusion (a nearer depth) is no evidence either way. The test errs
    towards "dynamic": a static point taken for moving costs a few redundant Gaussians, a moving
    one taken for static cannot follow its object.

    Args:
        points: ``[N, 3]`` world points.
        K: ``[V, 3, 3]``; w2c: ``[V, T, 4, 4]``: the cameras that observed the clip.
        depth: ``[V, T, H, W]`` their z-depth (0 = unknown: no evidence); rgb: ``[V, T, H, W, 3]``.

    Returns:
        ``[N]`` bool.
    """
    V, T, H, W = depth.shape
    moved = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    for v in range(V):
        uv, z = project(points[None].expand(T, -1, -1), K[v].expand(T, 3, 3), w2c[v])  # [T, N, 2], [T, N]
        c0, r0 = (uv[..., 0] - 0.5).floor().long(), (uv[..., 1] - 0.5).floor().long()
        fc, fr = (uv[..., 0] - 0.5 - c0)[..., None], (uv[..., 1] - 0.5 - r0)[..., None]
        # The four pixel centres around the projection: one-pixel aliasing at depth edges is no
        # evidence of motion, so the point is seen through only if all four say so, and its colour
        # is compared only where all four are on its surface.
        behind = torch.ones_like(z, dtype=torch.bool)
        seen = torch.ones_like(behind)  # all four on this surface: the colour mixes no other one
        color = torch.zeros(*z.shape, 3, device=z.device)  # bilinear colour at the projection
        for dc, dr in ((0, 0), (1, 0), (0, 1), (1, 1)):
            col, row = c0 + dc, r0 + dr
            inside = (z > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
            idx = row.clamp(0, H - 1) * W + col.clamp(0, W - 1)
            d = torch.gather(depth[v].reshape(T, -1), 1, idx)
            known = inside & (d > 0)
            seen &= known & ((z - d).abs() <= rel_tol * d)
            behind &= known & (d > z * (1 + rel_tol))
            w = (fc if dc else 1 - fc) * (fr if dr else 1 - fr)
            color += w * torch.gather(rgb[v].reshape(T, -1, 3), 1, idx[..., None].expand(-1, -1, 3))
        inf = torch.tensor(float("inf"), device=z.device)
        hi = torch.where(seen[..., None], color, -inf).amax(0)  # [N, 3] over the times it is seen
        lo = torch.where(seen[..., None], color, inf).amin(0)
        recoloured = (seen.sum(0) > 1) & ((hi - lo).amax(-1) > color_tol)
        moved |= behind.any(0) | recoloured
    return ~moved
