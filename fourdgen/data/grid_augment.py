"""4Real-Video-V2's training-data augmentations for multi-view grids (section 3.1, "Training").

- :class:`HomographyGrids` ("2D transformed videos"): a monocular clip becomes V synchronized views,
  view v being every frame warped by one random homography ``H_v`` (fixed over time: a fixed
  virtual camera). View 0 is the clip itself.
- :class:`StaticGrids` ("3D videos"): a static multi-view capture (one instant seen from V cameras)
  duplicated over T timesteps: a grid without motion.
- :class:`MixedGrids`: draws each sample from one of several grid datasets with given weights.

Homography views have no pinhole camera: their ``K``/``w2c`` are the source's and carry no meaning
(4Real-Video-V2 uses no camera poses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from fourdgen.data.batch import GridBatch


def random_homographies(
    num_views: int, height: int, width: int, strength: float = 0.1, generator=None
) -> Tensor:
    """``[V, 3, 3]`` pixel-space homographies (source pixel -> view pixel); view 0 is the identity.

    Views form a sweep: the four image corners move by ``(v / (V - 1)) * strength * size`` along a
    random direction per view pair plus a small random jitter, so neighbouring views differ
    smoothly (a camera-like pan/tilt/zoom), not independently."""
    V = num_views
    corners = torch.tensor([[0.0, 0.0], [width, 0.0], [width, height], [0.0, height]])
    size = torch.tensor([width, height], dtype=torch.float32)
    direction = torch.rand(4, 2, generator=generator) * 2 - 1  # one sweep direction per corner
    out = [torch.eye(3)]
    for v in range(1, V):
        s = v / max(V - 1, 1)
        jitter = (torch.rand(4, 2, generator=generator) * 2 - 1) * 0.25
        moved = corners + (s * direction + jitter * s) * strength * size
        out.append(homography_from_points(corners, moved))
    return torch.stack(out)


def homography_from_points(src: Tensor, dst: Tensor) -> Tensor:
    """The homography mapping 4 points ``src [4, 2]`` to ``dst [4, 2]`` (DLT, ``H[2, 2] = 1``)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src.tolist(), dst.tolist(), strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    h = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))
    return torch.cat([h, h.new_ones(1)]).reshape(3, 3).float()


def warp_homography(
    frames: Tensor, H: Tensor, mode: str = "bilinear", fill: float = -1.0
) -> tuple[Tensor, Tensor]:
    """Warp ``frames [N, C, h, w]`` by ``H [3, 3]`` (source pixel -> output pixel, corner-origin
    coordinates, pixel centres at +0.5). Returns the warped frames and ``valid [N, 1, h, w]``;
    pixels from outside the source get ``fill`` (-1: black for RGB in [-1, 1])."""
    N, C, h, w = frames.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    pix = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(-1, 3).to(frames.device)
    src = pix @ torch.linalg.inv(H.double()).float().to(frames.device).T  # output pixel -> source
    src = src[:, :2] / src[:, 2:3]
    grid = torch.stack([src[:, 0] / w * 2 - 1, src[:, 1] / h * 2 - 1], -1).reshape(1, h, w, 2)
    grid = grid.expand(N, h, w, 2)
    out = F.grid_sample(frames.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    valid = (grid.abs() <= 1).all(-1)[:, None]
    return torch.where(valid, out, torch.full_like(out, fill)).to(frames.dtype), valid


def _observe(V: int, T: int, condition: str) -> Tensor:
    obs = torch.zeros(V, T, dtype=torch.bool)
    parts = condition.split("+")
    obs[0, 0] = "first_frame" in parts
    if "first_view" in parts:
        obs[0] = True
    if "first_time" in parts:
        obs[:, 0] = True
    return obs


class HomographyGrids(Dataset):
    """V synchronized views from single-view samples (``GridBatch`` with V = 1) of ``base``.

    Args:
        num_views: views per grid. strength: corner displacement of the last view, in image sizes.
        condition: given cells, as ``GridDataset``'s ``condition`` (``first_view+first_time``...).
        seed: per-index deterministic homographies (None: fresh ones every draw).
    """

    def __init__(
        self,
        base: Dataset,
        num_views: int = 4,
        strength: float = 0.15,
        condition: str = "first_view+first_time",
        seed: int | None = None,
    ):
        self.base, self.num_views, self.strength = base, num_views, strength
        self.condition, self.seed = condition, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int) -> GridBatch:
        b = self.base[idx]
        _, V0, T, H, W = b.shape
        if V0 != 1:
            raise ValueError(
                f"HomographyGrids: base sample {idx} has {V0} views, expected 1 (a monocular clip)"
            )
        g = None if self.seed is None else torch.Generator().manual_seed(self.seed + idx)
        Hs = random_homographies(self.num_views, H, W, self.strength, g)
        V = self.num_views
        rgb = torch.stack([warp_homography(b.rgb[0, 0], Hv)[0] for Hv in Hs])
        extra = {}
        for name in ("depth", "mask"):
            x = getattr(b, name)
            if x is not None:
                extra[name] = torch.stack([warp_homography(x[0, 0], Hv, "nearest", 0.0)[0] for Hv in Hs])[
                    None
                ]
        return GridBatch(
            rgb=rgb[None],
            K=b.K.expand(1, V, 3, 3).clone(),
            w2c=b.w2c.expand(1, V, T, 4, 4).clone(),
            observed=_observe(V, T, self.condition)[None],
            times=b.times,
            view_ids=torch.arange(V)[None],
            time_ids=b.time_ids,
            caption=b.caption,
            scene_id=[f"{s}_homography" for s in b.scene_id],
            **extra,
        )


class StaticGrids(Dataset):
    """Static multi-view samples of ``base`` (V views; only their first timestep is used) repeated
    over ``num_frames`` timesteps: cameras constant over time, ``times`` all 0."""

    def __init__(self, base: Dataset, num_frames: int, condition: str = "first_view+first_time"):
        self.base, self.num_frames, self.condition = base, num_frames, condition

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int) -> GridBatch:
        b = self.base[idx]
        _, V, _, _, _ = b.shape
        T = self.num_frames

        def rep(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[:, :, :1].expand(-1, -1, T, *x.shape[3:]).clone()

        return GridBatch(
            rgb=rep(b.rgb),
            K=b.K,
            w2c=rep(b.w2c),
            observed=_observe(V, T, self.condition)[None],
            times=torch.zeros(1, T),
            view_ids=b.view_ids,
            time_ids=b.time_ids[:, :1].expand(1, T).clone(),
            depth=rep(b.depth),
            mask=rep(b.mask),
            caption=b.caption,
            scene_id=[f"{s}_static" for s in b.scene_id],
        )


class MixedGrids(Dataset):
    """``length`` samples, each from source i with probability ``weights[i]`` (a random item of it).
    All sources must give grids of one shape (checked on first use of each source)."""

    def __init__(self, datasets: list[Dataset], weights: list[float], length: int, seed: int | None = None):
        if len(datasets) != len(weights) or not datasets or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"MixedGrids: one non-negative weight per dataset (some > 0), got {weights}")
        self.datasets, self.weights, self.length = datasets, torch.tensor(weights, dtype=torch.float), length
        self.seed = seed
        self._shape: tuple | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> GridBatch:
        g = None if self.seed is None else torch.Generator().manual_seed(self.seed + idx)
        i = int(torch.multinomial(self.weights, 1, generator=g))
        ds = self.datasets[i]
        b = ds[int(torch.randint(len(ds), (1,), generator=g))]
        shape = tuple(b.shape[1:])
        if self._shape is None:
            self._shape = (shape, i)
        elif shape != self._shape[0]:
            raise ValueError(
                f"MixedGrids: source {i} gives grids (V, T, H, W) = {shape}, source {self._shape[1]} gave "
                f"{self._shape[0]}; give every source the same views, frames and size"
            )
        return b
