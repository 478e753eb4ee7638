"""Projection and unprojection under the convention of :mod:`fourdgen.geometry.cameras`.

Pixel coordinates ``uv`` are image-plane coordinates with the origin at the top-left *corner*
of the top-left pixel: pixel (col i, row j) covers [i, i+1) x [j, j+1), its centre is
(i + 0.5, j + 0.5). Depth is always camera z (not distance along the ray).

Leading dims broadcast the usual (right-aligned) way, except in :func:`to_first_camera` and
:func:`rebase_cameras`, where the reference camera's leading dims are a *prefix* of the other
argument's (one reference camera per batch item, shared by all its frames).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cameras import invert_rigid, pixel_centers


def transform_points(T: Tensor, points: Tensor) -> Tensor:
    """Apply rigid/affine ``T [..., 4, 4]`` to ``points [..., N, 3]`` -> ``[..., N, 3]``.

    Written as ``points @ R^T + t`` so the batched matmul is [N, 3] x [3, 3] per item and the
    rotation is never expanded to one copy per point.
    """
    return points @ T[..., :3, :3].transpose(-1, -2) + T[..., None, :3, 3]


def project(points: Tensor, K: Tensor, w2c: Tensor | None = None, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Project world ``points [..., N, 3]`` with ``K [..., 3, 3]`` and ``w2c [..., 4, 4]``.

    Returns ``uv [..., N, 2]`` (corner-origin pixel coordinates) and camera depth ``z [..., N]``.
    ``w2c=None`` means the points are already in the camera frame. ``uv`` of points with
    ``z <= 0`` is meaningless (they are behind the camera): mask them with ``z``.
    """
    cam = points if w2c is None else transform_points(w2c, points)
    z = cam[..., 2]
    # Keep the division finite for points on the camera plane; callers mask them out anyway.
    z_safe = torch.where(z.abs() < eps, torch.full_like(z, eps), z)
    pix = cam @ K.transpose(-1, -2)  # [..., N, 3] = (K @ X)^T
    return pix[..., :2] / z_safe[..., None], z


def unproject(uv: Tensor, z: Tensor, K: Tensor, w2c: Tensor | None = None) -> Tensor:
    """Inverse of :func:`project`: pixel coordinates ``uv [..., N, 2]`` at camera depth
    ``z [..., N]`` -> world points ``[..., N, 3]`` (camera-frame points if ``w2c`` is None)."""
    fx, fy, skew = K[..., None, 0, 0], K[..., None, 1, 1], K[..., None, 0, 1]
    cx, cy = K[..., None, 0, 2], K[..., None, 1, 2]
    # Solve K @ (x, y, 1) = (u, v, 1) by back-substitution (K is upper triangular).
    y = (uv[..., 1] - cy) / fy
    x = (uv[..., 0] - cx - skew * y) / fx
    cam = torch.stack(torch.broadcast_tensors(x * z, y * z, z), dim=-1)
    return cam if w2c is None else transform_points(invert_rigid(w2c), cam)


def depth_to_points(depth: Tensor, K: Tensor, w2c: Tensor | None = None) -> Tensor:
    """Unproject a z-depth map ``depth [..., H, W]`` through pixel centres.

    ``K [..., 3, 3]``; ``w2c [..., 4, 4]`` or None. Returns the pointmap ``[..., H, W, 3]`` in world
    coordinates, or in the camera frame when ``w2c`` is None. Pixel (col i, row j) is unprojected
    at (i + 0.5, j + 0.5).
    """
    H, W = depth.shape[-2:]
    uv = pixel_centers(H, W, device=depth.device, dtype=depth.dtype).reshape(H * W, 2)
    pts = unproject(uv, depth.reshape(*depth.shape[:-2], H * W), K, w2c)
    return pts.reshape(*pts.shape[:-2], H, W, 3)


def points_to_depth(points: Tensor, w2c: Tensor | None = None) -> Tensor:
    """Camera z ``[..., N]`` of world ``points [..., N, 3]`` (camera-frame if ``w2c`` is None)."""
    if w2c is None:
        return points[..., 2]
    # Only the third row of w2c is needed: z = r3 . X + t_z.
    return (points * w2c[..., None, 2, :3]).sum(-1) + w2c[..., None, 2, 3]


def pointmap_to_depth(xyz: Tensor, w2c: Tensor | None = None) -> Tensor:
    """Camera z-depth ``[..., H, W]`` of a pointmap ``xyz [..., H, W, 3]`` seen from ``w2c [..., 4, 4]``.

    Inverse of :func:`depth_to_points` when ``w2c`` is the same camera.
    """
    H, W = xyz.shape[-3:-1]
    z = points_to_depth(xyz.reshape(*xyz.shape[:-3], H * W, 3), w2c)
    return z.reshape(*z.shape[:-1], H, W)


def _apply_prefix(T: Tensor, points: Tensor) -> Tensor:
    """``T [B..., 4, 4]`` applied to ``points [B..., *P, 3]``: T's leading dims are a prefix."""
    nb = T.ndim - 2
    if points.shape[:nb] != T.shape[:-2]:
        raise ValueError(f"camera batch {tuple(T.shape[:-2])} is not a prefix of {tuple(points.shape)}")
    flat = points.reshape(*points.shape[:nb], -1, 3)
    return transform_points(T, flat).reshape(points.shape)


def to_first_camera(xyz_world: Tensor, w2c_first: Tensor) -> Tensor:
    """Express world points ``xyz_world [B..., *P, 3]`` in the frame of ``w2c_first [B..., 4, 4]``.

    This is the 4DNeX / One4D pointmap convention: every frame's points in the coordinates of
    camera 0 at time 0. ``*P`` is any point layout, e.g. ``[T, H, W]`` for a video's pointmaps;
    ``B...`` (possibly empty) is one reference camera per batch item.
    """
    return _apply_prefix(w2c_first, xyz_world)


def rebase_cameras(w2c: Tensor, w2c_ref: Tensor) -> Tensor:
    """Re-express cameras ``w2c [B..., *V, 4, 4]`` in the frame of ``w2c_ref [B..., 4, 4]``.

    The new world frame is the reference camera's frame, so the reference camera becomes the
    identity and ``project(to_first_camera(X, w2c_ref), K, rebase_cameras(w2c, w2c_ref))``
    equals ``project(X, K, w2c)``. Since X_world = c2w_ref @ X_ref: w2c' = w2c @ c2w_ref.
    """
    nb = w2c_ref.ndim - 2
    if w2c.shape[:nb] != w2c_ref.shape[:-2]:
        raise ValueError(f"reference batch {tuple(w2c_ref.shape[:-2])} is not a prefix of {tuple(w2c.shape)}")
    c2w_ref = invert_rigid(w2c_ref).reshape(*w2c_ref.shape[:-2], *[1] * (w2c.ndim - w2c_ref.ndim), 4, 4)
    return w2c @ c2w_ref


def reprojection_error(points: Tensor, uv: Tensor, K: Tensor, w2c: Tensor | None = None) -> Tensor:
    """Pixel distance ``[..., N]`` between the projections of ``points [..., N, 3]`` and the
    observations ``uv [..., N, 2]``."""
    uv_hat, _ = project(points, K, w2c)
    return (uv_hat - uv).norm(dim=-1)
