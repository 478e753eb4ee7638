"""Pointmap (XYZ video) normalisation for RGB+XYZ video diffusion (4DNeX).

Pipeline (4DNeX, section 3 and its released code): pointmaps in the first camera's frame ->
per-frame clip to the [2, 98] percentiles of the valid points -> centre each frame at
(min + max) / 2 -> one global scale so every frame fits in [-1, 1] -> (VAE) -> latents
renormalised as (z + 0.13) / 1.70. Every step is recorded so generated pointmaps can be mapped
back (:func:`denormalize_pointmaps`).

Per-frame centring (4DNeX's choice) removes the frame-to-frame drift of the clip's bounding-box
centre, and with it part of the camera motion: cameras recovered from normalised predictions are
biased by that per-frame offset. ``center="global"`` (One4D, section 4.1: pointmaps "using the first
frame as the global coordinate frame", normalised before VAE encoding) keeps one centre and one scale
for the clip, so the first camera's frame stays one global frame. A recipe picks one with
:class:`PointmapNormalization`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fourdgen.components import Recorded
from fourdgen.geometry.projection import depth_to_points, to_first_camera

LATENT_SHIFT, LATENT_SCALE = 0.13, 1.70  # 4DNeX's pointmap-latent renormalisation


@dataclass
class PointmapNorm:
    """What :func:`normalize_pointmaps` did: ``centers [T, 3]``, ``scale`` (scalar tensor),
    per-frame clip bounds ``lo, hi [T, 3]``."""

    centers: Tensor
    scale: Tensor
    lo: Tensor
    hi: Tensor


def normalize_pointmaps(
    xyz: Tensor,
    valid: Tensor | None = None,
    percentiles: tuple[float, float] = (2.0, 98.0),
    center: str = "per_frame",
    eps: float = 1e-6,
) -> tuple[Tensor, PointmapNorm]:
    """``xyz [T, H, W, 3]`` (first-camera frame), ``valid [T, H, W]`` -> normalised ``[T, H, W, 3]``
    in [-1, 1] and the :class:`PointmapNorm` to undo it. Invalid points are clipped like the others."""
    T = xyz.shape[0]
    flat = xyz.reshape(T, -1, 3).float()
    vmask = (
        torch.ones(flat.shape[:2], dtype=torch.bool, device=xyz.device)
        if valid is None
        else valid.reshape(T, -1)
    )
    q = torch.tensor([percentiles[0] / 100, percentiles[1] / 100], device=xyz.device)
    lo, hi = [], []
    for t in range(T):
        pts = flat[t][vmask[t]] if vmask[t].any() else flat[t]
        b = torch.quantile(pts, q, dim=0)  # [2, 3]
        lo.append(b[0])
        hi.append(b[1])
    lo, hi = torch.stack(lo), torch.stack(hi)
    if center == "per_frame":
        centers = (lo + hi) / 2
    elif center == "global":
        centers = ((lo.amin(0) + hi.amax(0)) / 2).expand(T, 3)
    else:
        raise ValueError(f"normalize_pointmaps: center must be 'per_frame' or 'global', got {center!r}")
    clipped = torch.maximum(torch.minimum(flat, hi[:, None]), lo[:, None])
    scale = torch.maximum((hi - centers).abs(), (lo - centers).abs()).amax().clamp_min(eps)
    out = (clipped - centers[:, None]) / scale
    return out.reshape(xyz.shape).to(xyz.dtype), PointmapNorm(centers=centers, scale=scale, lo=lo, hi=hi)


class PointmapNormalization(Recorded):
    """How a clip's pointmaps reach [-1, 1] before the VAE: into the first camera's frame, clipped to
    per-frame percentiles, then centred ``"per_frame"`` (4DNeX) or ``"global"`` (One4D) and scaled
    by one factor (:func:`normalize_pointmaps`). The model and its latent cache use the same one."""

    def __init__(self, center: str = "per_frame", percentiles: tuple[float, float] = (2.0, 98.0)):
        if center not in ("per_frame", "global"):
            raise ValueError(f"PointmapNormalization: center must be 'per_frame' or 'global', got {center!r}")
        self.center, self.percentiles = center, (float(percentiles[0]), float(percentiles[1]))

    @property
    def cache_key(self) -> str:
        return f"{self.center}:{self.percentiles[0]}:{self.percentiles[1]}"

    def __call__(
        self, xyz_world: Tensor, w2c_first: Tensor, valid: Tensor | None = None
    ) -> tuple[Tensor, PointmapNorm]:
        """``xyz_world [T, H, W, 3]``, ``w2c_first [4, 4]`` -> ``[T, H, W, 3]`` in [-1, 1] and the
        :class:`PointmapNorm` that undoes it (in the first camera's frame)."""
        first = to_first_camera(xyz_world, w2c_first)
        return normalize_pointmaps(first, valid, self.percentiles, self.center)


def denormalize_pointmaps(xyz_norm: Tensor, norm: PointmapNorm) -> Tensor:
    """Inverse of :func:`normalize_pointmaps` (exact for points inside the clip bounds)."""
    T = xyz_norm.shape[0]
    flat = xyz_norm.reshape(T, -1, 3).float() * norm.scale + norm.centers[:, None]
    return flat.reshape(xyz_norm.shape).to(xyz_norm.dtype)


def xyz_condition_grid(height: int, width: int) -> Tensor:
    """4DNeX's initial XYZ map for the first frame ``[H, W, 3]`` in [-1, 1] (official
    ``generate_uniform_pointmap`` of core/finetune/datasets/utils.py, then ``* 2 - 1`` as training,
    datasets/wan_dataset.py, and inference, models/wan_i2v/demb_samerope_trainer.py, apply it):
    x and y are linspaces over columns and rows, z falls linearly from 1 on the top row to -1 on the
    bottom row. (The official 1e-8 in its z normalisation is below float32 resolution: dropped.)"""
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack([x, y, -y], dim=-1)


def guided_mask(num_frames: int, rgb_value: float = 1.0, xyz_value: float = 0.5) -> Tensor:
    """Guided mask per frame and half ``[T, 2]`` (column 0: RGB half, 1: XYZ half): the first
    frame is a condition (1 on RGB, 0.5 on the synthetic XYZ guess), later frames 0."""
    m = torch.zeros(num_frames, 2)
    m[0, 0], m[0, 1] = rgb_value, xyz_value
    return m


def renormalize_latents(z: Tensor, shift: float = LATENT_SHIFT, scale: float = LATENT_SCALE) -> Tensor:
    """Pointmap latents -> the diffusion model's range: ``(z + shift) / scale``."""
    return (z + shift) / scale


def denormalize_latents(z: Tensor, shift: float = LATENT_SHIFT, scale: float = LATENT_SCALE) -> Tensor:
    return z * scale - shift


def latent_stats(latents: Tensor) -> tuple[float, float]:
    """(shift, scale) that map a sample of pointmap latents to zero mean and unit std, for data
    other than 4DNeX-10M: ``shift = -mean``, ``scale = std``."""
    z = latents.float()
    return -z.mean().item(), z.std().item()


def world_pointmaps(b) -> torch.Tensor:
    """``[B, V, T, H, W, 3]`` world points of a :class:`~fourdgen.batch.GridBatch`, from ``xyz`` or,
    failing that, ``depth`` + cameras."""
    if b.xyz is not None:
        return b.xyz.permute(0, 1, 2, 4, 5, 3)
    if b.depth is None:
        raise ValueError("pointmap clips need 'xyz' or 'depth' in the scene (GridBatch.xyz / .depth)")
    B, V, T, H, W = b.shape
    K = b.K[:, :, None].expand(B, V, T, 3, 3)
    return depth_to_points(b.depth[:, :, :, 0], K, b.w2c)
