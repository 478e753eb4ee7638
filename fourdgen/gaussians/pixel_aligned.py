"""Pixel-aligned Gaussians: one Gaussian per pixel of each input frame, placed on the unprojected
depth and refined by a dense head's residuals (Splatt3r / 4Real-Video-V2's Gaussian head).

Head channels (``GAUSSIAN_CHANNELS`` = 14), all residuals that are 0 at initialisation:
``[0:3]`` position offset (world units, added to the unprojected depth), ``[3]`` opacity logit,
``[4:7]`` log-scale offset relative to the pixel footprint ``depth / focal`` (soft-clamped to
+-5), ``[7:11]`` rotation
(wxyz, added to the identity then normalised), ``[11:14]`` colour offset added to the pixel's RGB.
A zero head thus gives the coloured point cloud of the depth maps, as splats one pixel wide.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from fourdgen.gaussians.container import Gaussians, rgb_to_sh0
from fourdgen.geometry.projection import depth_to_points

GAUSSIAN_CHANNELS = 14
MAX_LOG_SCALE = 5.0  # splats between e^-5 and e^5 pixel footprints


def pixel_gaussians(raw: Tensor, rgb: Tensor, depth: Tensor, K: Tensor, w2c: Tensor) -> dict[str, Tensor]:
    """Gaussian parameters of every pixel.

    Args:
        raw: ``[..., 14, H, W]`` head outputs; rgb ``[..., 3, H, W]`` in [0, 1];
            depth ``[..., H, W]`` z-depth; K ``[..., 3, 3]``; w2c ``[..., 4, 4]`` (same leading dims).
    Returns:
        dict of ``means [..., H*W, 3]``, ``log_scales [..., H*W, 3]``, ``quats [..., H*W, 4]``,
        ``opacity_logits [..., H*W]``, ``sh0 [..., H*W, 1, 3]`` (rasterizer field names).
    """
    if raw.shape[-3] != GAUSSIAN_CHANNELS:
        raise ValueError(f"raw head output has {raw.shape[-3]} channels, want {GAUSSIAN_CHANNELS}")
    raw = rearrange(raw.float(), "... c h w -> ... (h w) c")
    d_xyz, opacity, d_scale, d_rot, d_rgb = raw.split([3, 1, 3, 4, 3], dim=-1)
    depth = depth.float()
    means = depth_to_points(depth, K.float(), w2c.float()).flatten(-3, -2) + d_xyz
    focal = K[..., :2, :2].diagonal(dim1=-2, dim2=-1).float().mean(-1)  # [...]
    footprint = depth.flatten(-2) / focal[..., None]  # [..., H*W]: one pixel at that depth
    # The residual is bounded (soft clamp to +-MAX_LOG_SCALE): unbounded, a few large steps make
    # splats span the image and their 2-D covariances overflow to inf/NaN in any rasterizer.
    d_scale = MAX_LOG_SCALE * torch.tanh(d_scale / MAX_LOG_SCALE)
    log_scales = footprint.clamp_min(1e-8).log()[..., None] + d_scale
    identity = torch.tensor([1.0, 0.0, 0.0, 0.0], device=raw.device)
    quats = torch.nn.functional.normalize(d_rot + identity, dim=-1)
    colour = rearrange(rgb.float(), "... c h w -> ... (h w) c") + d_rgb
    return {
        "means": means,
        "log_scales": log_scales,
        "quats": quats,
        "opacity_logits": opacity[..., 0],
        "sh0": rgb_to_sh0(colour)[..., None, :],
    }


def to_gaussians(params: dict[str, Tensor]) -> Gaussians:
    """One set (no leading dims beyond N) as a :class:`Gaussians` (degree-0 SH)."""
    n = params["means"].shape[0]
    return Gaussians(
        means=params["means"],
        log_scales=params["log_scales"],
        quats=params["quats"],
        opacity_logits=params["opacity_logits"],
        sh0=params["sh0"],
        shN=params["means"].new_zeros(n, 0, 3),
    )
