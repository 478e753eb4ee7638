"""HexPlane: a 4D (x, y, z, t) feature field factorised into six 2D planes (K-Planes / HexPlane,
as used by 4DGaussians and Full-4D's 4DGS stage).

For each resolution level the features sampled from the planes xy, xz, yz, xt, yt, zt are
multiplied together (Hadamard product); levels are concatenated. Spatial planes start at
uniform(0.1, 0.5) and time planes at 1, so at initialisation the field does not depend on time.
Hand-written: no library ships a differentiable K-Planes grid for torch.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Plane (a, b) samples coordinates a and b of (x, y, z, t); order: xy, xz, xt, yz, yt, zt.
PLANES: tuple[tuple[int, int], ...] = tuple(itertools.combinations(range(4), 2))
TIME_PLANES = tuple(i for i, p in enumerate(PLANES) if 3 in p)
SPACE_PLANES = tuple(i for i, p in enumerate(PLANES) if 3 not in p)


def _interp_weights(pos: Tensor, size: int) -> Tensor:
    """Dense linear-interpolation weights ``[N, size]`` of grid positions ``pos [N]`` in [0, size-1]
    (two non-zeros per row; differentiable in ``pos``)."""
    i0 = pos.detach().floor().clamp(0, size - 2).long()
    frac = pos - i0
    w = torch.stack([1 - frac, frac], dim=-1)
    return pos.new_zeros(len(pos), size).scatter(1, torch.stack([i0, i0 + 1], dim=-1), w)


def _line_lookup(line: Tensor, pos: Tensor) -> Tensor:
    """``line [C, A]`` sampled at ``pos [N]`` (grid units) -> ``[N, C]``, as a dense matmul."""
    return _interp_weights(pos, line.shape[-1]) @ line.T


def shared_time_lookup(plane: Tensor, u: Tensor, t: Tensor) -> Tensor:
    """Bilinear lookup of a time plane ``[1, C, T, A]`` at ``(u [N] in [-1, 1], one t in [0, 1])``.

    Same values and gradients as ``grid_sample(align_corners=True, padding_mode="border")``. When
    every point shares one time (one render), the row is blended first and the lookup is a
    ``[N, A] x [A, C]`` matmul whose backward is a matmul too, instead of grid_sample's backward
    scattering N points into one row's A cells with atomics. The weights are recomputed in backward
    (checkpoint), so memory stays O(N C).
    """
    T, A = plane.shape[-2:]
    pt = t.clamp(0, 1) * (T - 1)
    line = torch.einsum("t,cta->ca", _interp_weights(pt.reshape(1), T)[0].to(plane.dtype), plane[0])
    pos = ((u.clamp(-1, 1) + 1) / 2 * (A - 1)).to(plane.dtype)
    if torch.is_grad_enabled() and (line.requires_grad or pos.requires_grad):
        return checkpoint(_line_lookup, line, pos, use_reentrant=False)
    return _line_lookup(line, pos)


class HexPlane(nn.Module):
    """Multi-resolution six-plane feature grid.

    Args:
        features: channels per plane.
        resolution: base grid size (x, y, z, t).
        multires: spatial upsampling factor per level (time keeps its base resolution).
        bounds: ``[2, 3]`` min/max corner of the spatial box mapped onto [-1, 1]; points outside
            are clamped to the border by ``grid_sample``.
        shared_time_matmul: look time planes up with :func:`shared_time_lookup` when all points
            share one time. ``None``: only on CUDA under ``torch.compile``, where it measured 1.3x
            faster than compiled grid_sample; uncompiled it is 2x slower (``benchmarks/deformation.py``).

    Output: ``[N, features * len(multires)]``.
    """

    def __init__(
        self,
        features: int = 32,
        resolution: tuple[int, int, int, int] = (64, 64, 64, 25),
        multires: tuple[int, ...] = (1, 2),
        bounds: Tensor | None = None,
        shared_time_matmul: bool | None = None,
    ):
        super().__init__()
        self.features, self.multires = features, tuple(multires)
        self.shared_time_matmul = shared_time_matmul
        self.levels = nn.ModuleList()
        for m in self.multires:
            res = [r * m for r in resolution[:3]] + [resolution[3]]
            planes = nn.ParameterList()
            for i, (a, b) in enumerate(PLANES):
                p = torch.empty(1, features, res[b], res[a])  # grid_sample: W indexes coord a, H coord b
                if i in TIME_PLANES:
                    nn.init.ones_(p)
                else:
                    nn.init.uniform_(p, 0.1, 0.5)
                planes.append(nn.Parameter(p))
            self.levels.append(planes)
        self.register_buffer(
            "bounds", torch.tensor([[-1.0] * 3, [1.0] * 3]) if bounds is None else bounds.float()
        )

    @property
    def out_dim(self) -> int:
        return self.features * len(self.multires)

    def set_bounds(self, lo: Tensor, hi: Tensor) -> None:
        self.bounds.copy_(torch.stack([lo, hi]).to(self.bounds))

    def normalize(self, xyz: Tensor, t: Tensor) -> Tensor:
        """``xyz [N, 3]`` world, ``t [N]`` in [0, 1] -> ``[N, 4]`` in [-1, 1]."""
        lo, hi = self.bounds[0], self.bounds[1]
        x = (xyz - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1
        return torch.cat([x, (t * 2 - 1)[:, None]], dim=-1)

    def forward(self, xyz: Tensor, t: Tensor | float) -> Tensor:
        """``xyz [N, 3]``, ``t [N]`` or a scalar shared by all points -> ``[N, out_dim]``."""
        t = torch.as_tensor(t, dtype=xyz.dtype, device=xyz.device)
        shared = t.numel() == 1
        coords = self.normalize(xyz, t.reshape(1).expand(len(xyz)) if shared else t)
        fast = self.shared_time_matmul
        if fast is None:  # the matmul path only pays off once the compiler fuses its weights
            fast = xyz.is_cuda and torch.compiler.is_compiling()
        shared = shared and fast
        out = []
        for planes in self.levels:
            feat = 1.0
            for (a, b), plane in zip(PLANES, planes, strict=True):
                if shared and b == 3:
                    feat = feat * shared_time_lookup(plane, coords[:, a], t.reshape(()))
                    continue
                grid = coords[:, [a, b]].view(1, -1, 1, 2).to(plane.dtype)
                sampled = F.grid_sample(
                    plane, grid, mode="bilinear", padding_mode="border", align_corners=True
                )
                feat = feat * sampled[0, :, :, 0].T  # [N, C]
            out.append(feat)
        return torch.cat(out, dim=-1)

    def _planes(self, which: tuple[int, ...]) -> list[Tensor]:
        return [planes[i] for planes in self.levels for i in which]

    def tv_loss(self) -> Tensor:
        """Total variation (squared first differences, both axes) of every plane."""
        loss = 0.0
        for p in self._planes(tuple(range(len(PLANES)))):
            loss = (
                loss
                + (p[..., 1:, :] - p[..., :-1, :]).square().mean()
                + (p[..., 1:] - p[..., :-1]).square().mean()
            )
        return loss

    def time_smoothness_loss(self) -> Tensor:
        """Squared second differences along the time axis of the time planes (smooth motion)."""
        loss = 0.0
        for p in self._planes(TIME_PLANES):
            d1 = p[..., 1:, :] - p[..., :-1, :]  # time is the H axis of every time plane
            loss = loss + (d1[..., 1:, :] - d1[..., :-1, :]).square().mean()
        return loss

    def time_l1_loss(self) -> Tensor:
        """L1 distance of time planes from 1 (their static value): motion only where needed."""
        return sum((1 - p).abs().mean() for p in self._planes(TIME_PLANES))
