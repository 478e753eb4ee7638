"""4Real-Video-V2's training-data augmentations for synchronized multi-view grids (section 3.1).

The paper trains on three sources; each has a dataset here that yields one-sample
:class:`~fourdgen.batch.GridBatch` grids like :class:`~fourdgen.data.datamodules.GridDataset`:

1. Synthetic multi-view videos: plain :class:`GridDataset` grids of multi-view scenes.
2. "2D transformed videos" (:class:`HomographyGridDataset`): a monocular clip becomes V
   synchronized views, view v being every frame warped by one random homography ``H_v``. ``H_v``
   is fixed over time (a fixed virtual camera per view): that is what makes the grid synchronized.
3. "3D videos" (:class:`StaticGridDataset`): a static multi-view capture (one instant seen by V
   cameras) duplicated over T timesteps: a grid without motion.

:class:`MixedGridDataset` draws training samples from several sources with given weights;
:class:`~fourdgen.data.augmented_grids.AugmentedGridDataModule` builds the three-source mixture
from a folder of scenes.

Homography convention: ``H`` maps *source* pixel coordinates to *output* pixel coordinates, both
corner-origin like ``K`` (:mod:`fourdgen.geometry.cameras`: pixel (i, j) has its centre at
(i + 0.5, j + 0.5)), so ``H = diag(1, 1, 1)`` plus a translation (dx, dy) shifts the image by
(dx, dy) pixels. Homography views carry no meaningful camera (4Real-Video-V2 uses no poses).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor
from torch.utils.data import Dataset

from fourdgen.batch import GridBatch
from fourdgen.data.datamodules import CONDITIONS, GridDataset
from fourdgen.data.synthetic import SyntheticConfig, ensure_scene

# Optional per-cell fields that follow the pixels / the grid; the caption-level embeddings pass
# through unchanged (view 0 at time 0 is the source's first cell in every augmentation).
_PIXEL_FIELDS = ("depth", "xyz", "mask")
_PASSTHROUGH = ("text_embeds", "neg_text_embeds", "image_embeds")
_MAX_STRENGTH = 0.25  # corner offsets below a quarter of the image keep the warped quad convex


# ------------------------------------------------------------------------------ homographies
def homography_from_points(src: Tensor, dst: Tensor) -> Tensor:
    """The homography ``[3, 3]`` mapping 4 points ``src [4, 2]`` to ``dst [4, 2]`` (DLT with
    ``H[2, 2] = 1``, solved in float64)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src.tolist(), dst.tolist(), strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    h = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))
    return torch.cat([h, h.new_ones(1)]).reshape(3, 3).float()


def image_corners(height: int, width: int) -> Tensor:
    """``[4, 2]`` (x, y) corners of the image (corner-origin pixels), clockwise from top-left."""
    return torch.tensor([[0.0, 0.0], [width, 0.0], [width, height], [0.0, height]])


def random_homographies(
    num_views: int,
    height: int,
    width: int,
    strength: float = 0.15,
    generator: torch.Generator | None = None,
    sweep: bool = True,
) -> Tensor:
    """``[V, 3, 3]`` random homographies (source pixel -> view pixel); view 0 is the identity.

    Each view moves the 4 image corners by at most ``strength * (width, height)`` and ``H_v``
    maps the image corners to the moved ones. ``strength < 0.25`` keeps the moved quad convex (no
    fold-over: a plausible camera-like perspective warp).

    ``sweep=True`` (default) orders the views along a smooth random path in corner-offset space,
    ``offset(s) = clamp(s * end + s (1 - s) * bend, -1, 1) * strength * size`` with
    ``s = v / (V - 1)``, so neighbouring views are similar, like cameras along a rig or a
    trajectory (``end``: the last view's offsets; ``bend`` curves the path). ``sweep=False`` draws every
    view's offsets independently (uniform in the same bounds).
    """
    if not 0 <= strength < _MAX_STRENGTH:
        raise ValueError(
            f"strength: expected in [0, {_MAX_STRENGTH}) (fraction of image size), got {strength}"
        )
    V = num_views

    def uniform(*shape: int) -> Tensor:  # in [-1, 1]
        return torch.rand(*shape, generator=generator) * 2 - 1

    if sweep:
        end, bend = uniform(4, 2), uniform(4, 2)
        s = torch.linspace(0, 1, V)[:, None, None] if V > 1 else torch.zeros(1, 1, 1)
        offsets = (s * end + s * (1 - s) * bend).clamp(-1, 1)  # [V, 4, 2]
    else:
        offsets = uniform(V, 4, 2)
    corners = image_corners(height, width)
    moved = corners + offsets * strength * torch.tensor([float(width), float(height)])
    out = [torch.eye(3)] + [homography_from_points(corners, m) for m in moved[1:]]
    return torch.stack(out)


def homography_grid(Hmat: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Sampling grid of the warp by ``Hmat [N, 3, 3]``: ``grid [N, h, w, 2]`` in
    ``grid_sample``'s normalised coordinates (``align_corners=False``) and ``valid [N, 1, h, w]``,
    True where the output pixel centre maps inside the source image."""
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    pix = torch.stack([xs, ys, torch.ones_like(xs)], -1).to(Hmat.device, torch.float64)  # [h, w, 3]
    src = torch.einsum("nij,hwj->nhwi", torch.linalg.inv(Hmat.double()), pix)  # output -> source
    z = src[..., 2:]
    xy = src[..., :2] / torch.where(z.abs() < 1e-12, torch.full_like(z, 1e-12), z)
    size = xy.new_tensor([width, height])
    valid = (z[..., 0] > 0) & ((xy >= 0) & (xy <= size)).all(-1)
    grid = torch.where(valid[..., None], xy / size * 2 - 1, torch.zeros_like(xy))  # no inf into grid_sample
    return grid.float(), valid[:, None]


def warp_homography(
    frames: Tensor, Hmat: Tensor, mode: str = "bilinear", fill: float = -1.0
) -> tuple[Tensor, Tensor]:
    """Warp ``frames [N, C, h, w]`` by ``Hmat [3, 3]`` (every frame) or ``[N, 3, 3]`` (one each).

    ``out(p) = frames(H^-1 p)`` at output pixel centres (corner-origin, see the module doc),
    sampled with ``grid_sample`` (``mode``: "bilinear", or "nearest" for depth/xyz/ids).
    Returns ``(out [N, C, h, w], valid [N, 1, h, w] bool)``; pixels whose source lies outside the
    image get ``fill`` (-1: black for RGB in [-1, 1]; use 0 for depth = unknown). Inside, samples
    near the border clamp to the edge pixels (``padding_mode="border"``) rather than blending in
    the fill. The dtype is kept (integer ids are sampled as floats and rounded back).
    """
    N, C, h, w = frames.shape
    if Hmat.shape not in ((3, 3), (N, 3, 3)):
        raise ValueError(f"warp_homography: Hmat must be [3, 3] or [{N}, 3, 3], got {list(Hmat.shape)}")
    grid, valid = homography_grid(Hmat.reshape(-1, 3, 3), h, w)
    grid, valid = grid.expand(N, h, w, 2), valid.expand(N, 1, h, w)
    out = F.grid_sample(frames.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    out = torch.where(valid, out, torch.full_like(out, fill))
    if not frames.is_floating_point():
        out = out.round()
    return out.to(frames.dtype), valid


# ------------------------------------------------------------------------------ grid helpers
def condition_mask(num_views: int, num_frames: int, condition: str | list[int]) -> Tensor:
    """``observed [V, T]`` bool for a :class:`GridDataset` ``condition``: ``none`` /
    ``first_frame`` (cell (0, 0)) / ``first_view`` (row 0) / ``first_time`` (column 0), several
    joined by ``+``, or a list of frame indices of view 0."""
    obs = torch.zeros(num_views, num_frames, dtype=torch.bool)
    if not isinstance(condition, str):
        bad = [t for t in condition if not 0 <= t < num_frames]
        if bad:
            raise ValueError(f"condition: frames {bad} outside the clip's {num_frames} frames")
        obs[0, list(condition)] = True
        return obs
    parts = condition.split("+")
    if any(p not in CONDITIONS for p in parts):
        raise ValueError(
            f"condition: expected one of {CONDITIONS} (or several joined by '+'), got {condition!r}"
        )
    obs[0, 0] = "first_frame" in parts
    if "first_view" in parts:
        obs[0] = True
    if "first_time" in parts:
        obs[:, 0] = True
    return obs


def check_condition(condition: str | list[int]) -> str | list[int]:
    """``condition`` as stored (a string, or a list of frames), its names checked now."""
    condition_mask(1, 1, condition if isinstance(condition, str) else [])  # validates strings early
    return condition if isinstance(condition, str) else list(condition)


def _generator(seed: int | None, idx: int) -> torch.Generator | None:
    """Per-index generator when seeded (distinct streams for (seed, idx) pairs); None = torch's
    global RNG, which DataLoader workers and ``seed_everything`` seed differently."""
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed * 1_000_003 + idx) % 2**63)


def _passthrough(b: GridBatch) -> dict[str, Tensor]:
    return {k: getattr(b, k) for k in _PASSTHROUGH if getattr(b, k) is not None}


# ------------------------------------------------------------------------------ datasets
class HomographyGridDataset(Dataset):
    """4Real-Video-V2's "2D transformed videos": V synchronized views of one monocular clip.

    ``base`` yields single-view grids (``GridBatch`` with V = 1: e.g. ``GridDataset(num_views=1)``
    over monocular clips or over one view of multi-view scenes). View v of the output is every
    frame of the clip warped by the same ``H_v`` (:func:`random_homographies`; view 0 = the clip,
    unchanged). RGB is warped bilinearly (outside -> -1, black); depth / xyz / mask with nearest
    sampling (outside -> 0, i.e. unknown depth). Values are carried, not re-projected: xyz still is
    the world point each pixel sees, depth the *source* camera's z.

    Cameras: a homography has no exact pinhole camera (``H_v @ K`` is not an intrinsic matrix in
    general), so every view keeps the source ``K`` and ``w2c``: the cameras of homography views are
    NOT meaningful. Use these grids only with models that take no camera poses (4Real-Video-V2).

    ``observed``: the base sample's row on view 0, OR the cells of ``condition`` (GridDataset's
    semantics on the V x T grid; 4Real-Video-V2: ``first_view+first_time``).
    ``scene_id`` gets a ``_homography`` suffix (logs and caches tell the sources apart).

    Args:
        num_views: views per grid. strength / sweep: see :func:`random_homographies`.
        seed: homographies drawn deterministically per index (None: fresh ones at every draw,
            from torch's RNG, so DataLoader workers differ).
    """

    def __init__(
        self,
        base: Dataset,
        num_views: int = 4,
        strength: float = 0.15,
        condition: str | list[int] = "first_view+first_time",
        seed: int | None = None,
        sweep: bool = True,
    ):
        if num_views < 1:
            raise ValueError(f"num_views: expected >= 1, got {num_views}")
        random_homographies(1, 1, 1, strength)  # validates strength now rather than in a worker
        self.base, self.num_views, self.strength, self.sweep = base, num_views, strength, sweep
        self.condition, self.seed = check_condition(condition), seed

    def __len__(self) -> int:
        return len(self.base)

    def homographies(self, idx: int, height: int, width: int) -> Tensor:
        """``[V, 3, 3]`` homographies of sample ``idx`` (reproducible only with a ``seed``)."""
        g = _generator(self.seed, idx)
        return random_homographies(self.num_views, height, width, self.strength, g, self.sweep)

    def __getitem__(self, idx: int) -> GridBatch:
        b = self.base[idx]
        B, V0, T, H, W = b.shape
        if V0 != 1:
            raise ValueError(
                f"HomographyGridDataset: base sample {idx} has {V0} views; expected a single-view clip "
                "(V = 1, e.g. GridDataset(num_views=1))"
            )
        V, Hs = self.num_views, self.homographies(idx, H, W)
        warped = {"rgb": _warp_views(b.rgb, Hs, "bilinear", -1.0)}
        for name in _PIXEL_FIELDS:
            if getattr(b, name) is not None:
                warped[name] = _warp_views(getattr(b, name), Hs, "nearest", 0.0)
        observed = repeat(condition_mask(V, T, self.condition), "v t -> b v t", b=B).clone()
        observed[:, 0] |= b.observed[:, 0]
        return GridBatch(
            K=b.K.expand(B, V, 3, 3).clone(),
            w2c=b.w2c.expand(B, V, T, 4, 4).clone(),
            observed=observed,
            times=b.times,
            view_ids=torch.arange(V).expand(B, V).clone(),
            time_ids=b.time_ids,
            caption=list(b.caption),
            scene_id=[f"{s}_homography" for s in b.scene_id],
            **warped,
            **_passthrough(b),
        ).validate()


def _warp_views(x: Tensor, Hs: Tensor, mode: str, fill: float) -> Tensor:
    """``x [B, 1, T, C, H, W]`` -> ``[B, V, T, C, H, W]``, view v = every frame warped by ``Hs[v]``
    (view 0 copied exactly: it is the identity)."""
    B = x.shape[0]
    frames = rearrange(x[:, 0], "b t c h w -> (b t) c h w")
    views = [frames.clone()] + [warp_homography(frames, Hv, mode, fill)[0] for Hv in Hs[1:]]
    return rearrange(torch.stack(views), "v (b t) c h w -> b v t c h w", b=B)


class StaticGridDataset(Dataset):
    """4Real-Video-V2's "3D videos": a static multi-view capture duplicated over time.

    ``base`` yields grids of V views; only their first timestep is used (e.g.
    ``GridDataset(num_frames=1)``: one instant of a multi-view scene, see
    :func:`static_synthetic_grids`). Every view's frame (and depth / xyz / mask) is repeated over
    ``num_frames`` timesteps with constant cameras (``w2c`` repeated). All frames show one
    instant, so ``times`` / ``time_ids`` repeat the source instant's (0 for a scene's first frame):
    pose-free grid models read the grid position, not ``times``, so the grid still reads as a
    T-frame video, one without motion.

    ``observed``: the base sample's column at its first time, OR the cells of ``condition``.
    ``scene_id`` gets a ``_static`` suffix.
    """

    def __init__(self, base: Dataset, num_frames: int, condition: str | list[int] = "first_view+first_time"):
        if num_frames < 1:
            raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
        self.base, self.num_frames, self.condition = base, num_frames, check_condition(condition)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int) -> GridBatch:
        b = self.base[idx]
        B, V = b.shape[:2]
        T = self.num_frames

        def dup(x: Tensor) -> Tensor:  # [B, V, T0, ...] -> [B, V, T, ...], time 0 repeated
            return repeat(x[:, :, 0], "b v ... -> b v t ...", t=T).contiguous()

        observed = repeat(condition_mask(V, T, self.condition), "v t -> b v t", b=B).clone()
        observed[:, :, 0] |= b.observed[:, :, 0]
        pixels = {k: dup(getattr(b, k)) for k in _PIXEL_FIELDS if getattr(b, k) is not None}
        return GridBatch(
            rgb=dup(b.rgb),
            K=b.K,
            w2c=dup(b.w2c),
            observed=observed,
            times=b.times[:, :1].expand(B, T).clone(),
            view_ids=b.view_ids,
            time_ids=b.time_ids[:, :1].expand(B, T).clone(),
            caption=list(b.caption),
            scene_id=[f"{s}_static" for s in b.scene_id],
            **pixels,
            **_passthrough(b),
        ).validate()


def static_synthetic_grids(
    root: str | Path,
    config: SyntheticConfig,
    num_frames: int,
    num_scenes: int = 1,
    num_views: int | None = None,
    height: int | None = None,
    width: int | None = None,
    condition: str | list[int] = "first_view+first_time",
    random_sampling: bool = False,
) -> StaticGridDataset:
    """Static grids of synthetic scenes: ``config``'s camera orbit / arc at one instant (t = 0).

    Writes ``num_scenes`` one-frame scenes (``config`` with ``num_frames=1``, seeds
    ``config.seed + i``) under ``root/static_XXX`` unless identical ones exist, and duplicates
    each over ``num_frames`` timesteps. Other arguments: see :class:`GridDataset`.
    """
    one = dataclasses.replace(config, num_frames=1)
    scenes = [
        ensure_scene(Path(root) / f"static_{i:03d}", dataclasses.replace(one, seed=one.seed + i))
        for i in range(num_scenes)
    ]
    base = GridDataset(
        scenes,
        num_views=num_views,
        num_frames=1,
        height=height,
        width=width,
        random_sampling=random_sampling,
        condition="none",
    )
    return StaticGridDataset(base, num_frames, condition)


class MixedGridDataset(Dataset):
    """``length`` samples, each a random item of source ``i`` drawn with probability
    ``weights[i] / sum(weights)`` (a weight of 0 disables a source).

    Every source must yield grids of one ``(V, T, H, W)`` and the same optional fields (so that
    :meth:`GridBatch.collate` can batch them): item 0 of every enabled source is checked at
    construction, and every drawn sample against it. ``seed``: per-index deterministic draws
    (None: torch's RNG). ``names``: source names for error messages.
    """

    def __init__(
        self,
        datasets: list[Dataset],
        weights: list[float],
        length: int,
        seed: int | None = None,
        names: list[str] | None = None,
    ):
        weights = [float(w) for w in weights]
        if len(datasets) != len(weights) or not datasets or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"MixedGridDataset: one non-negative weight per dataset ({len(datasets)}), some > 0; "
                f"got {weights}"
            )
        if length < 1:
            raise ValueError(f"MixedGridDataset: length must be >= 1, got {length}")
        self.names = names or [str(i) for i in range(len(datasets))]
        for i, (ds, w) in enumerate(zip(datasets, weights, strict=True)):
            if w > 0 and len(ds) == 0:
                raise ValueError(f"MixedGridDataset: source {self._name(i)} is empty but has weight {w}")
        self.datasets, self.weights, self.length, self.seed = datasets, torch.tensor(weights), length, seed
        self._ref: tuple[int, tuple] | None = None
        for i, ds in enumerate(datasets):
            if weights[i] > 0:
                self._check(i, ds[0])

    def _name(self, i: int) -> str:
        return f"{i} ({self.names[i]!r})" if self.names[i] != str(i) else str(i)

    def _check(self, i: int, b: GridBatch) -> None:
        sig = (tuple(b.shape[1:]), tuple(k for k in _PIXEL_FIELDS if getattr(b, k) is not None))
        if self._ref is None:
            self._ref = (i, sig)
            return
        j, ref = self._ref
        if sig[0] != ref[0]:
            raise ValueError(
                f"MixedGridDataset: source {self._name(i)} yields grids (V, T, H, W) = {sig[0]}, but source "
                f"{self._name(j)} yields {ref[0]}; every source must give the same views, frames and size"
            )
        if sig[1] != ref[1]:
            raise ValueError(
                f"MixedGridDataset: source {self._name(i)} has optional fields {list(sig[1])}, but source "
                f"{self._name(j)} has {list(ref[1])}; GridBatch.collate needs the same ones in every sample"
            )

    def __len__(self) -> int:
        return self.length

    def draw(self, idx: int) -> tuple[int, int]:
        """(source, item) of sample ``idx``."""
        g = _generator(self.seed, idx)
        i = int(torch.multinomial(self.weights, 1, generator=g))
        return i, int(torch.randint(len(self.datasets[i]), (), generator=g))

    def __getitem__(self, idx: int) -> GridBatch:
        i, j = self.draw(idx)
        b = self.datasets[i][j]
        self._check(i, b)
        return b


# Names of the first version of this module (fourdgen.data.multiview imports them).
