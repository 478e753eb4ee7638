"""Per-view monocular depth made consistent with the source view (Full-4D's geometry front end).

A per-image depth model (Depth Anything V2) gives every view of a generated grid its own unknown
scale (and, for disparity, shift). The source video's depth fixes the scene's scale: lifted to
world points and splatted into each other view (:func:`~fourdgen.geometry.pointcloud.
render_pointmap_to_view`), it gives a reference on the pixels it covers, and each view's estimate
is fitted to it (:func:`~fourdgen.geometry.align.align_depth`, one fit per view over all frames).
:func:`fuse_points` then lifts the aligned grid into one coloured point cloud (Gaussian init).
Cameras follow :mod:`fourdgen.geometry.cameras`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .align import align_depth, depth_from_fit
from .pointcloud import render_pointmap_to_view
from .projection import depth_to_points, project


def smooth_coverage(depth: Tensor, mask: Tensor, tol: float) -> Tensor:
    """``mask [..., H, W]`` without pixels next to a depth edge of the rendered ``depth [..., H, W]``:
    kept where the covered 3x3 neighbourhood's max depth is within ``1 + tol`` of its min. Splat
    footprints and z-buffer ties misplace depth at silhouettes; those pixels would bias the fit."""
    lead = depth.shape[:-2]
    d = depth.reshape(-1, 1, *depth.shape[-2:])
    m = mask.reshape(d.shape)
    hi = F.max_pool2d(torch.where(m, d, 0.0), 3, stride=1, padding=1)
    lo = -F.max_pool2d(torch.where(m, -d, -torch.inf), 3, stride=1, padding=1)
    return (m & (hi <= lo * (1.0 + tol))).reshape(*lead, *depth.shape[-2:])


@torch.no_grad()
def project_source_depth(
    K: Tensor,
    w2c: Tensor,
    source_view: int,
    source_depth: Tensor,
    radius_px: int = 1,
    edge_tol: float | None = 0.05,
    chunk: int = 8,
    views: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The source view's depth seen from every view at every frame.

    ``K [V, 3, 3]``, ``w2c [V, T, 4, 4]``, ``source_depth [T, H, W]`` (0 = unknown). Returns
    ``depth [V, T, H, W]`` (camera z of the visible source point in each view, 0 = uncovered),
    ``uv [V, T, H, W, 2]`` (that point's exact sub-pixel position, corner-origin pixels) and
    ``covered [V, T, H, W]`` bool (splatted and, unless ``edge_tol`` is None, away from depth edges,
    see :func:`smooth_coverage`). Frames are rendered ``chunk`` at a time to bound memory; only
    ``views`` are rendered (None: all), the others are left uncovered.
    """
    V, T = w2c.shape[:2]
    H, W = source_depth.shape[-2:]
    sd = source_depth.to(w2c.dtype)
    xyz = depth_to_points(sd, K[source_view], w2c[source_view])  # [T, H, W, 3] world
    ok = (sd > 0) & torch.isfinite(sd)
    depth = torch.zeros(V, T, H, W, dtype=sd.dtype, device=sd.device)
    uv = torch.zeros(V, T, H, W, 2, dtype=sd.dtype, device=sd.device)
    covered = torch.zeros(V, T, H, W, dtype=torch.bool, device=sd.device)
    for v in range(V) if views is None else views:
        for t0 in range(0, T, chunk):
            s = slice(t0, min(t0 + chunk, T))
            # The "colour" splatted is each point's own projection: the winner's sub-pixel position.
            p_uv, _ = project(xyz[s].reshape(-1, H * W, 3), K[v], w2c[v, s])  # [t, H W, 2]
            p_uv = p_uv.transpose(-1, -2).reshape(-1, 2, H, W)
            img, d, m = render_pointmap_to_view(
                xyz[s], p_uv, K[v], w2c[v, s], H, W, valid=ok[s], radius_px=radius_px
            )
            depth[v, s], uv[v, s] = d, img.movedim(-3, -1)
            covered[v, s] = m if edge_tol is None else smooth_coverage(d, m, edge_tol)
    return depth, uv, covered


def sample_at(image: Tensor, uv: Tensor) -> Tensor:
    """Bilinear samples of ``image [T, H, W]`` at corner-origin pixel positions ``uv [T, H, W, 2]``
    -> ``[T, H, W]`` (border values outside)."""
    H, W = image.shape[-2:]
    scale = torch.tensor([2.0 / W, 2.0 / H], dtype=uv.dtype, device=uv.device)
    grid = (uv * scale - 1.0).to(image.dtype)  # align_corners=False: pixel corners at -1 and 1
    out = F.grid_sample(image[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, 0]


def align_views_to_source(
    estimates: Tensor,
    space: str,
    K: Tensor,
    w2c: Tensor,
    source_view: int,
    source_depth: Tensor,
    mode: str = "scale_shift",
    min_pixels: int = 64,
    radius_px: int = 1,
    edge_tol: float | None = 0.05,
    outlier_factor: float | None = 3.0,
) -> tuple[Tensor, list[dict]]:
    """Align every view's monocular estimate to the source view's depth.

    Args:
        estimates: ``[V, T, H, W]`` per-view predictions in ``space`` (``"disparity"`` or ``"depth"``).
        K: ``[V, 3, 3]``; w2c: ``[V, T, 4, 4]``.
        source_view: the view whose depth is known; it keeps ``source_depth`` exactly.
        source_depth: ``[T, H, W]`` z-depth of the source view (0 = unknown), in scene units.
        mode: ``"scale_shift"`` or ``"scale"`` (see :func:`~fourdgen.geometry.align.align_depth`).
        min_pixels: a view whose frames together have fewer covered pixels raises ``ValueError``
            naming it: a silent fallback would put a wrongly scaled view into the 4D fit.
        radius_px, edge_tol: splat footprint and edge filter of :func:`project_source_depth`.
        outlier_factor: refit once without the pixels whose relative depth error exceeds this many
            times the median (occlusion leaks, mixed edge samples); None fits once.

    Returns:
        ``depth [V, T, H, W]`` (0 = unknown) in ``estimates``' dtype, and one report per view:
        ``{"view", "a", "b", "pixels", "rel_residual"}``: the fitted ``a * estimate + b`` (in
        ``space``), the covered pixels the final fit used, and the mean relative depth error
        ``|aligned - projected| / projected`` on them. The source view has ``a = b = None`` (not
        fitted), its valid pixel count and 0 residual.
    """
    V, T, H, W = estimates.shape
    if tuple(source_depth.shape) != (T, H, W):
        raise ValueError(f"source_depth: expected [{T}, {H}, {W}], got {list(source_depth.shape)}")
    if not 0 <= source_view < V:
        raise ValueError(f"source_view {source_view} is not one of the {V} views")
    others = [v for v in range(V) if v != source_view]
    proj, uv, covered = project_source_depth(
        K, w2c, source_view, source_depth, radius_px, edge_tol, views=others
    )
    out = torch.zeros_like(estimates)
    reports = []
    for v in range(V):
        if v == source_view:
            out[v] = source_depth.to(out)
            n = int((source_depth > 0).sum())
            reports.append({"view": v, "a": None, "b": None, "pixels": n, "rel_residual": 0.0})
            continue
        n = int(covered[v].sum())
        if n < min_pixels:
            raise ValueError(
                f"view {v}: the source view's depth covers {n} pixels, fewer than min_pixels={min_pixels}; "
                "it cannot be aligned (views too far apart, or source depth missing)"
            )
        # The estimate where each source point truly lands, not at the pixel centre it is stored in:
        # half a pixel of depth gradient is a few percent at silhouettes and grazing floors.
        at_points = sample_at(estimates[v], uv[v])
        use = covered[v]
        fit, a, b = align_depth(at_points, proj[v], use, space, mode, return_params=True)
        if outlier_factor is not None:  # one refit without the pixels the first fit explains worst
            rel = (fit.double() - proj[v]).abs() / proj[v].clamp_min(1e-12)
            keep = use & (rel <= (outlier_factor * rel[use].median()).clamp_min(1e-6))
            if int(keep.sum()) >= min_pixels:
                use = keep
                fit, a, b = align_depth(at_points, proj[v], use, space, mode, return_params=True)
        used = use & (fit > 0)
        err = ((fit[used].double() - proj[v][used]).abs() / proj[v][used]).mean()
        out[v] = depth_from_fit(estimates[v], a, b, space)
        reports.append(
            {"view": v, "a": float(a), "b": float(b), "pixels": int(use.sum()), "rel_residual": float(err)}
        )
    return out, reports


def fuse_points(
    depth: Tensor, rgb: Tensor, K: Tensor, w2c: Tensor, frames: int | list[int] | None = None
) -> tuple[Tensor, Tensor]:
    """One coloured point cloud from a grid of depth maps (e.g. to initialise Gaussians).

    ``depth [V, T, H, W]`` (0 = unknown), ``rgb [V, T, 3, H, W]`` in [0, 1], ``K [V, 3, 3]``,
    ``w2c [V, T, 4, 4]``; ``frames``: the time indices to use (an int, a list, None = all).
    Returns world ``points [N, 3]`` and ``colors [N, 3]`` of the pixels with finite depth > 0,
    in view, frame, row, column order.
    """
    if frames is not None:
        idx = torch.as_tensor([frames] if isinstance(frames, int) else list(frames), device=depth.device)
        depth, rgb, w2c = depth[:, idx], rgb[:, idx], w2c[:, idx]
    xyz = depth_to_points(depth, K[:, None].to(depth), w2c.to(depth))  # [V, T, H, W, 3]
    valid = (depth > 0) & torch.isfinite(depth)
    return xyz[valid], rgb.movedim(-3, -1)[valid]
