"""A plain container of 3D Gaussian tensors (no nn.Module: the stage modules own the Parameters).

Field conventions follow gsplat and the original 3DGS code, so that the tensors can be handed to
``gsplat.rasterization`` and written to standard 3DGS PLY files without conversion:

- ``means [N, 3]`` world-space centres.
- ``log_scales [N, 3]`` log of the per-axis standard deviations.
- ``quats [N, 4]`` rotations as (w, x, y, z); need not be normalised (every consumer normalises).
- ``opacity_logits [N]`` pre-sigmoid opacities.
- ``sh0 [N, 1, 3]`` degree-0 SH coefficient (colour = 0.5 + C0 * sh0), ``shN [N, K - 1, 3]`` the
  higher bands, K = (degree + 1) ** 2 (``shN`` has 0 rows for degree 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

SH_C0 = 0.28209479177387814  # Y_0^0 = 1 / (2 sqrt(pi))


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """RGB in [0, 1] ``[..., 3]`` -> degree-0 SH coefficient ``[..., 3]`` (inverse of ``sh0_to_rgb``)."""
    return (rgb - 0.5) / SH_C0


def sh0_to_rgb(sh0: Tensor) -> Tensor:
    """Degree-0 SH coefficient ``[..., 3]`` -> RGB ``[..., 3]`` (not clamped, like gsplat's +0.5)."""
    return sh0 * SH_C0 + 0.5


def num_sh_bases(degree: int) -> int:
    return (degree + 1) ** 2


def sh_degree_from_bases(k: int) -> int:
    """SH degree of ``k`` bases; ``k`` must be a perfect square (1, 4, 9, 16, ...)."""
    d = math.isqrt(k) - 1
    if d < 0 or (d + 1) ** 2 != k:
        raise ValueError(f"{k} is not a number of SH bases (must be (degree + 1)^2)")
    return d


@dataclass
class Gaussians:
    """N 3D Gaussians. See the module docstring for shapes and conventions."""

    means: Tensor
    log_scales: Tensor
    quats: Tensor
    opacity_logits: Tensor
    sh0: Tensor
    shN: Tensor

    def __post_init__(self) -> None:
        n = self.means.shape[0]
        expect = {
            "means": (n, 3),
            "log_scales": (n, 3),
            "quats": (n, 4),
            "opacity_logits": (n,),
            "sh0": (n, 1, 3),
        }
        for name, shape in expect.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"Gaussians.{name} has shape {tuple(getattr(self, name).shape)}, want {shape}"
                )
        if self.shN.dim() != 3 or self.shN.shape[0] != n or self.shN.shape[2] != 3:
            raise ValueError(f"Gaussians.shN has shape {tuple(self.shN.shape)}, want ({n}, K-1, 3)")
        sh_degree_from_bases(self.shN.shape[1] + 1)  # validates K

    # ----------------------------------------------------------------------------- properties
    @property
    def num(self) -> int:
        return self.means.shape[0]

    def __len__(self) -> int:
        return self.num

    @property
    def scales(self) -> Tensor:
        """``[N, 3]`` standard deviations."""
        return self.log_scales.exp()

    @property
    def opacities(self) -> Tensor:
        """``[N]`` opacities in (0, 1)."""
        return torch.sigmoid(self.opacity_logits)

    @property
    def sh(self) -> Tensor:
        """All SH coefficients ``[N, K, 3]`` (gsplat's ``colors`` layout with ``sh_degree``)."""
        return torch.cat([self.sh0, self.shN], dim=1)

    @property
    def sh_degree(self) -> int:
        return sh_degree_from_bases(self.shN.shape[1] + 1)

    @property
    def rgb(self) -> Tensor:
        """View-independent colour ``[N, 3]`` from the DC term, clamped to [0, 1]."""
        return sh0_to_rgb(self.sh0[:, 0]).clamp(0.0, 1.0)

    @property
    def device(self) -> torch.device:
        return self.means.device

    # ------------------------------------------------------------------------------- transforms
    def _map(self, fn) -> Gaussians:
        return Gaussians(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device=None, dtype: torch.dtype | None = None) -> Gaussians:
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def detach(self) -> Gaussians:
        return self._map(lambda t: t.detach())

    def clone(self) -> Gaussians:
        return self._map(lambda t: t.clone())

    def index(self, mask_or_idx: Tensor | slice) -> Gaussians:
        """Subset by a boolean mask ``[N]``, integer indices ``[M]`` or a slice."""
        return self._map(lambda t: t[mask_or_idx])

    def cat(self, other: Gaussians) -> Gaussians:
        """Concatenate two sets with the same SH degree."""
        if other.sh_degree != self.sh_degree:
            raise ValueError(f"cannot cat SH degree {self.sh_degree} with {other.sh_degree}")
        return Gaussians(
            **{f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)}
        )

    def with_sh_degree(self, degree: int) -> Gaussians:
        """Same Gaussians with ``shN`` truncated or zero-padded to ``degree``."""
        k = num_sh_bases(degree) - 1
        shN = self.shN[:, :k]
        if shN.shape[1] < k:
            shN = torch.cat([shN, shN.new_zeros(self.num, k - shN.shape[1], 3)], dim=1)
        return Gaussians(self.means, self.log_scales, self.quats, self.opacity_logits, self.sh0, shN)

    # ------------------------------------------------------------------------------ checkpoints
    def as_dict(self) -> dict[str, Tensor]:
        """Field name -> tensor (for ``state_dict``-style checkpoints)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Tensor]) -> Gaussians:
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise KeyError(f"Gaussians.from_dict: missing {missing}")
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    # ---------------------------------------------------------------------------- construction
    @classmethod
    def from_points(
        cls,
        xyz: Tensor,
        rgb: Tensor,
        sh_degree: int = 0,
        init_opacity: float = 0.1,
        scale_mult: float = 1.0,
        chunk: int = 2**24,
    ) -> Gaussians:
        """Isotropic Gaussians at points ``xyz [N, 3]`` with colours ``rgb [N, 3]`` in [0, 1].

        The scale is ``scale_mult`` x the mean distance to the 3 nearest neighbours (as in 3DGS), so
        the initial splats roughly tile the point cloud without large overlaps.
        """
        xyz = xyz.float()
        n = xyz.shape[0]
        dist = knn_mean_distance(xyz, k=3, chunk=chunk)
        log_scales = torch.log(dist * scale_mult)[:, None].repeat(1, 3)
        quats = torch.zeros(n, 4, device=xyz.device)
        quats[:, 0] = 1.0
        opacity_logits = torch.full((n,), math.log(init_opacity / (1.0 - init_opacity)), device=xyz.device)
        sh0 = rgb_to_sh0(rgb.float().to(xyz.device))[:, None, :]
        shN = torch.zeros(n, num_sh_bases(sh_degree) - 1, 3, device=xyz.device)
        return cls(xyz.clone(), log_scales, quats, opacity_logits, sh0, shN)


@torch.no_grad()
def knn_mean_distance(xyz: Tensor, k: int = 3, block: int = 1024, chunk: int = 2**24) -> Tensor:
    """Mean distance ``[N]`` from each point to its ``k`` nearest other points (exact).

    Chunked ``torch.cdist``, pruned so that 100k points take seconds on a CPU, not minutes: queries
    go in compact blocks of <= ``block`` points (kd-tree leaves); the k-th neighbour distance
    within a block bounds its queries' true ones by ``r``, so only points inside the block's
    bounding box grown by ``r`` can be neighbours. At most ``chunk`` distances at a time.
    """
    n = xyz.shape[0]
    if n < 2:
        return xyz.new_ones(n)
    k = min(k, n - 1)
    xyz = xyz.float()
    by_x = torch.argsort(xyz[:, 0])
    xs, sorted_pts = xyz[by_x, 0].contiguous(), xyz[by_x]
    out = torch.empty(n, device=xyz.device)
    for ids in _kd_leaves(xyz, max(block, 2 * k + 2)):  # leaves keep > k points
        q = xyz[ids]
        c = q.mean(0)
        r = _dist(q - c, q - c).topk(k + 1, dim=1, largest=False).values[:, -1].max() * (1 + 1e-5)
        lo, hi = q.min(0).values - r, q.max(0).values + r
        i0, i1 = torch.searchsorted(xs, lo[0]), torch.searchsorted(xs, hi[0], right=True)
        cand = sorted_pts[i0:i1]
        cand = cand[((cand >= lo) & (cand <= hi)).all(1)] - c
        rows = max(1, chunk // len(cand))
        for j in range(0, len(ids), rows):  # the query itself is a candidate at distance 0: drop it
            d = _dist(q[j : j + rows] - c, cand).topk(k + 1, dim=1, largest=False).values
            out[ids[j : j + rows]] = d[:, 1:].mean(1)
    return out.clamp_min(1e-7)


def _dist(a: Tensor, b: Tensor) -> Tensor:
    # cdist's matmul shortcut loses ~1e-4 relative on near neighbours; direct differences are exact
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _kd_leaves(xyz: Tensor, block: int) -> list[Tensor]:
    """Index sets of <= ``block`` (and > block / 2) points from median splits along the widest axis."""
    leaves, todo = [], [torch.arange(xyz.shape[0], device=xyz.device)]
    while todo:
        ids = todo.pop()
        if len(ids) <= block:
            leaves.append(ids)
            continue
        p = xyz[ids]
        o = torch.argsort(p[:, (p.max(0).values - p.min(0).values).argmax()])
        todo += [ids[o[: len(ids) // 2]], ids[o[len(ids) // 2 :]]]
    return leaves
