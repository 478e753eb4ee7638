"""Coarse z-buffer point splatting: Full-4D-style point-cloud projection conditioning.

A dynamic point cloud lifted from a video's depth is rendered into a target camera; the
rendered image, depth and coverage mask condition a video model. No Python loop over points:
every (point, footprint pixel) pair is a candidate, the depth buffer is a ``scatter_reduce``
``amin`` over a linearised pixel index, and the winner of each pixel is the candidate at that
minimum depth with the smallest point index (so ties are resolved deterministically, on CPU and
GPU alike). There is no blending or anti-aliasing; holes stay background with ``mask`` False.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .projection import project


def render_points(
    points: Tensor,
    colors: Tensor,
    K: Tensor,
    w2c: Tensor | None,
    height: int,
    width: int,
    radius_px: int = 1,
    background: float | Tensor = 0.0,
    near: float = 1e-3,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Splat ``points [..., N, 3]`` (world) with ``colors [..., N, C]`` into a camera.

    Args:
        K: ``[..., 3, 3]`` intrinsics of the ``height x width`` target image.
        w2c: ``[..., 4, 4]`` target camera, or None if ``points`` are camera-frame already.
        radius_px: square footprint half-size: each point covers the (2r+1) x (2r+1) pixels
            centred on the pixel its projection falls in (r=0: that single pixel). Footprint
            pixels inside the image are drawn even when the centre pixel is just outside, so
            rendering then cropping equals rendering with cropped intrinsics.
        background: colour of uncovered pixels, a scalar or ``[C]``.
        near: points with camera z <= near (or non-finite) are dropped.
        valid: optional ``[..., N]`` bool, False drops a point (e.g. invalid depth).

    Leading dims of all inputs broadcast. Returns ``image [..., C, H, W]`` (dtype of
    ``colors``), ``depth [..., H, W]`` (camera z of the winning point, 0 where uncovered) and
    ``mask [..., H, W]`` (bool, covered). ``image`` is differentiable w.r.t. ``colors`` and
    ``depth`` w.r.t. ``points``; the visibility decision is not.
    """
    r = int(radius_px)
    if r < 0:
        raise ValueError(f"radius_px must be >= 0, got {radius_px}")
    H, W = int(height), int(width)
    N, C = points.shape[-2], colors.shape[-1]
    uv, z = project(points, K, w2c)
    shapes = [uv.shape[:-2], colors.shape[:-2]] + ([valid.shape[:-1]] if valid is not None else [])
    lead = torch.broadcast_shapes(*shapes)
    B = lead.numel()
    device = points.device
    uv = uv.expand(*lead, N, 2).reshape(B, N, 2)
    z = z.expand(*lead, N).reshape(B, N)
    colors = colors.expand(*lead, N, C).reshape(B * N, C)

    bg = torch.as_tensor(background, dtype=colors.dtype, device=device).expand(C)
    if N == 0:
        image = bg.reshape(C, 1, 1).expand(*lead, C, H, W).clone()
        depth = torch.zeros(*lead, H, W, dtype=z.dtype, device=device)
        return image, depth, torch.zeros(*lead, H, W, dtype=torch.bool, device=device)

    ok = (z > near) & torch.isfinite(z) & torch.isfinite(uv).all(-1)
    if valid is not None:
        ok = ok & valid.expand(*lead, N).reshape(B, N)
    # Clamp before the integer cast: points near the camera plane project to huge uv.
    u0 = uv[..., 0].nan_to_num(0.0).clamp(-r - 1, W + r).floor().long()
    v0 = uv[..., 1].nan_to_num(0.0).clamp(-r - 1, H + r).floor().long()
    offs = torch.arange(-r, r + 1, device=device)
    cu = u0[..., None, None] + offs[None, :]  # [B, N, 1, F] -> broadcasts to [B, N, F, F]
    cv = v0[..., None, None] + offs[:, None]  # [B, N, F, 1]
    inside = (cu >= 0) & (cu < W) & (cv >= 0) & (cv < H) & ok[..., None, None]
    b = torch.arange(B, device=device).reshape(B, 1, 1, 1)
    dummy = B * H * W  # one extra bin swallows the dropped candidates: no data-dependent shapes
    pix = torch.where(inside, (b * H + cv) * W + cu, dummy).reshape(-1)
    inside = inside.reshape(-1)
    F2 = (2 * r + 1) ** 2
    zc = z[..., None].expand(B, N, F2).reshape(-1)
    gid = torch.arange(B * N, device=device)[:, None].expand(B * N, F2).reshape(-1)

    zbuf = torch.full((dummy + 1,), float("inf"), dtype=z.dtype, device=device)
    zbuf.scatter_reduce_(0, pix, zc.detach(), reduce="amin")
    # Exact float equality is safe: zbuf holds copies of the very same values.
    win = inside & (zc.detach() == zbuf[pix])
    sentinel = B * N
    ibuf = torch.full((dummy + 1,), sentinel, dtype=torch.long, device=device)
    ibuf.scatter_reduce_(0, pix, torch.where(win, gid, sentinel), reduce="amin")

    ibuf = ibuf[:dummy].reshape(B, H * W)
    mask = ibuf < sentinel
    idx = ibuf.clamp(max=sentinel - 1)
    image = torch.where(mask[..., None], colors[idx], bg)  # [B, H*W, C]
    depth = torch.where(mask, z.reshape(-1)[idx], torch.zeros((), dtype=z.dtype, device=device))
    image = image.transpose(-1, -2).reshape(*lead, C, H, W)
    return image, depth.reshape(*lead, H, W), mask.reshape(*lead, H, W)


def render_pointmap_to_view(
    xyz: Tensor,
    rgb: Tensor,
    K_tgt: Tensor,
    w2c_tgt: Tensor | None,
    height: int,
    width: int,
    valid: Tensor | None = None,
    radius_px: int = 1,
    background: float | Tensor = 0.0,
    near: float = 1e-3,
) -> tuple[Tensor, Tensor, Tensor]:
    """Render a pointmap ``xyz [..., h, w, 3]`` (world) coloured by ``rgb [..., C, h, w]`` into
    the target camera ``K_tgt [..., 3, 3]``, ``w2c_tgt [..., 4, 4]`` of size ``height x width``.

    ``valid [..., h, w]`` (optional bool) masks source pixels without depth. Typical use: lift
    frame t with :func:`~fourdgen.geometry.projection.depth_to_points` and render it into the
    target view of frame t. Returns ``image [..., C, H, W]``, ``depth [..., H, W]``,
    ``mask [..., H, W]`` as :func:`render_points`.
    """
    h, w = xyz.shape[-3:-1]
    points = xyz.reshape(*xyz.shape[:-3], h * w, 3)
    colors = rgb.reshape(*rgb.shape[:-2], h * w).transpose(-1, -2)
    if valid is not None:
        valid = valid.reshape(*valid.shape[:-2], h * w)
    return render_points(points, colors, K_tgt, w2c_tgt, height, width, radius_px, background, near, valid)
