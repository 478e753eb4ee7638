"""4D deformation of canonical Gaussians (4DGaussians-style, Full-4D section 3.3).

A HexPlane feature of (x, y, z, t) feeds a small MLP with separate heads for position, scale and
rotation offsets. The heads' last layers are zero-initialised, so the scene starts static.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fourdgen.gaussians.hexplane import HexPlane


@dataclass
class Deformation:
    """Per-Gaussian offsets: ``d_means [N, 3]``, ``d_log_scales [N, 3]``, ``d_quats [N, 4]``."""

    d_means: Tensor
    d_log_scales: Tensor
    d_quats: Tensor


def _head(width: int, out: int) -> nn.Sequential:
    head = nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out))
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


class DeformationField(nn.Module):
    """(x, y, z, t) -> offsets of position, log-scale and quaternion.

    Args:
        features / resolution / multires: HexPlane settings (4DGaussians: 32, (64, 64, 64, 25), (1, 2)).
        width: MLP width; depth: hidden layers after the feature projection.
        deform_scale / deform_rotation: enable those heads (position is always on).
    """

    def __init__(
        self,
        features: int = 32,
        resolution: tuple[int, int, int, int] = (64, 64, 64, 25),
        multires: tuple[int, ...] = (1, 2),
        width: int = 64,
        depth: int = 1,
        deform_scale: bool = True,
        deform_rotation: bool = True,
    ):
        super().__init__()
        self.config = {
            "features": features,
            "resolution": list(resolution),
            "multires": list(multires),
            "width": width,
            "depth": depth,
            "deform_scale": deform_scale,
            "deform_rotation": deform_rotation,
        }
        self.grid = HexPlane(features, resolution, multires)
        layers: list[nn.Module] = [nn.Linear(self.grid.out_dim, width)]
        for _ in range(depth - 1):
            layers += [nn.ReLU(), nn.Linear(width, width)]
        self.feature_out = nn.Sequential(*layers)
        self.pos_head = _head(width, 3)
        self.scale_head = _head(width, 3) if deform_scale else None
        self.rot_head = _head(width, 4) if deform_rotation else None

    def set_bounds(self, lo: Tensor, hi: Tensor) -> None:
        """Spatial box the HexPlane covers (e.g. the initial point cloud's, padded)."""
        self.grid.set_bounds(lo, hi)

    def forward(self, means: Tensor, t: Tensor | float) -> Deformation:
        """``means [N, 3]`` canonical positions, ``t`` scalar or ``[N]`` normalised time."""
        t = torch.as_tensor(t, dtype=means.dtype, device=means.device)  # scalar: HexPlane's fast path
        h = self.feature_out(self.grid(means, t))
        zeros = means.new_zeros
        return Deformation(
            d_means=self.pos_head(h),
            d_log_scales=self.scale_head(h) if self.scale_head is not None else zeros(means.shape[0], 3),
            d_quats=self.rot_head(h) if self.rot_head is not None else zeros(means.shape[0], 4),
        )

    def regularization(self) -> dict[str, Tensor]:
        """HexPlane regularisers: ``tv``, ``time_smooth``, ``time_l1``."""
        return {
            "tv": self.grid.tv_loss(),
            "time_smooth": self.grid.time_smoothness_loss(),
            "time_l1": self.grid.time_l1_loss(),
        }
