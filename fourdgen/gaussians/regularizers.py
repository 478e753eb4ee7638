"""Losses on novel views of a 4D Gaussian scene: the fitter's regulariser slot.

When a regulariser is due (``start_step``, ``every``), the fitter samples a camera on the
interpolated path between the training views (seeded by the step, so a resumed fit draws the same
cameras), renders the clip from it (the whole clip, or as many random frames as the due
regularisers ask for: ``frames``) and hands a :class:`NovelViewRender` to each regulariser.
Flow-matching distillation (Full-4D, :mod:`fourdgen.gaussians.fmd`) plugs in here. Frozen models a
regulariser uses are loaded by it, never trained, and kept out of the fitter's checkpoint (the
fitter does not register regularisers as submodules); a resumed fit builds them again from the
recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fourdgen.gaussians.losses import inverse_depth_l1
from fourdgen.geometry.cameras import camera_centers
from fourdgen.geometry.warp import backward_warp, forward_depth


@dataclass
class SourceClip:
    """The input video of a generated grid, at the fitted resolution: ``rgb [T, 3, H, W]`` in
    [0, 1], ``depth [T, H, W]`` camera z (0 = unknown) or None, ``K [3, 3]``, ``w2c [T, 4, 4]``,
    ``times [T]``; ``view`` is its row in the scene, ``caption`` the scene's, ``rig [V, 4, 4]`` the
    first-frame cameras of all the scene's views."""

    rgb: Tensor
    depth: Tensor | None
    K: Tensor
    w2c: Tensor
    times: Tensor
    view: int
    caption: str = ""
    rig: Tensor | None = None


@dataclass
class NovelViewRender:
    """A clip rendered from one novel camera. ``rgb [T, 3, H, W]`` in [0, 1], ``alpha`` and
    ``depth [T, 1, H, W]``, ``K [3, 3]``, ``w2c [4, 4]``, ``times [T]`` in [0, 1], ``step``;
    ``frames [T]``: which of the scene's frames they are (None: all, in order)."""

    rgb: Tensor
    alpha: Tensor
    depth: Tensor | None
    K: Tensor
    w2c: Tensor
    times: Tensor
    step: int
    batch: Any = None
    frames: Tensor | None = None


class NovelViewRegularizer(nn.Module):
    """Base class: ``forward(render) -> scalar loss``; the fitter adds ``weight * loss`` and logs it
    as ``train/reg_<name>``.

    Args:
        weight: loss weight.
        start_step: first global step at which it applies (e.g. after the coarse stage).
        every: it applies at every ``every``-th step from ``start_step`` on.
        frames: how many of the clip's frames it needs rendered (random ones, drawn per step; None:
            the whole clip). The fitter renders the most any due regulariser asks for.

    ``needs_source``: the fitter passes the scene's :class:`SourceClip` to :meth:`setup`;
    ``needs_views``: it passes every training view's, one :class:`SourceClip` each, to
    :meth:`setup_views`.
    """

    name = "novel_view"
    needs_source = False
    needs_views = False

    def __init__(self, weight: float = 1.0, start_step: int = 0, every: int = 1, frames: int | None = None):
        super().__init__()
        if every < 1:
            raise ValueError(f"{type(self).__name__}.every: expected an integer >= 1, got {every}")
        if frames is not None and frames < 1:
            raise ValueError(f"{type(self).__name__}.frames: expected an integer >= 1 or null, got {frames}")
        self.weight, self.start_step, self.every, self.frames = weight, start_step, every, frames

    def due(self, step: int) -> bool:
        """Whether it applies at global step ``step``."""
        return step >= self.start_step and (step - self.start_step) % self.every == 0

    def setup(self, source: SourceClip | None) -> None:
        """Called once by the fitter before training, with the scene's source clip when
        ``needs_source`` (frozen models load lazily, on the first call, on the right device)."""

    def setup_views(self, views: list[SourceClip]) -> None:
        """Called once by the fitter before training with the training views when ``needs_views``."""

    def forward(self, render: NovelViewRender) -> Tensor:
        raise NotImplementedError


class CoverageRegularizer(NovelViewRegularizer):
    """Penalises see-through pixels on novel views (``mean(1 - alpha)``): scenes whose background
    is fully opaque should stay opaque between the training cameras."""

    name = "coverage"

    def forward(self, render: NovelViewRender) -> Tensor:
        return (1 - render.alpha).mean()


class WarpConsistency(NovelViewRegularizer):
    """L1 between a novel view and the training views warped into it through its rendered depth.

    For each frame of the novel render, the ``views`` training cameras nearest to it lend their
    images, sampled where the render's expected depth lands in them (:func:`~fourdgen.geometry.
    warp.backward_warp`: only where that camera sees the same surface, by its depth). Their mean
    is the target, without gradient; the loss is the mean absolute error on the pixels that have
    one and that the render covers (``alpha > min_alpha``). Six cameras can be fitted exactly by
    Gaussians that smear between them; this asks the views between them to agree with what the
    cameras saw (Lambertian scenes; Binocular-Guided 3DGS, Han et al. 2024, warps training views
    into shifted cameras the same way). Needs the training views' depth (the scene's depth files,
    e.g. ``fourdgen generate``'s, or ``data.depth_model``'s). Measured on six synthetic cameras:
    +1.5 dB on the held-out pixels some camera sees (benchmarks/RESULTS.md, issue 17 sixth pass).

    ``depth="views"`` warps through the depth the nearest training views see instead
    (:func:`~fourdgen.geometry.warp.forward_depth`, their depth maps rasterised as meshes into the novel
    camera): the target no longer depends on the render's geometry, so floaters and holes between
    the cameras are supervised too, wherever a training view saw the surface. ``depth_weight`` then
    adds the inverse-depth L1 of the render against that depth (a pseudo depth map per novel view).

    Args:
        frames: frames of the novel clip per step (default 1: one extra render a step).
        views: how many training cameras (nearest by camera centre) warp into each novel view.
        rel_tol: the occlusion and depth-edge test of :func:`backward_warp`.
        min_alpha: novel-view pixels with less opacity have no surface to warp from (``depth="render"``).
        depth: ``"render"`` (the render's expected depth) or ``"views"`` (the training views').
        depth_weight: ``depth="views"`` only: weight of the render's inverse-depth L1 against it.
    """

    name = "warp"
    needs_views = True

    def __init__(
        self,
        weight: float = 1.0,
        start_step: int = 0,
        every: int = 1,
        frames: int | None = 1,
        views: int = 2,
        rel_tol: float = 0.01,
        min_alpha: float = 0.5,
        depth: str = "render",
        depth_weight: float = 0.0,
    ):
        super().__init__(weight, start_step, every, frames)
        if views < 1:
            raise ValueError(f"WarpConsistency.views: expected an integer >= 1, got {views}")
        if depth not in ("render", "views"):
            raise ValueError(f"WarpConsistency.depth: expected 'render' or 'views', got {depth!r}")
        if depth_weight and depth != "views":
            raise ValueError(f"WarpConsistency.depth_weight: {depth_weight} needs depth: views")
        self.views, self.rel_tol, self.min_alpha = views, rel_tol, min_alpha
        self.depth, self.depth_weight = depth, depth_weight
        self._clips: list[SourceClip] = []
        self._stacked: tuple[Tensor, ...] | None = None

    def setup_views(self, views: list[SourceClip]) -> None:
        missing = [c.view for c in views if c.depth is None]
        if missing:
            raise ValueError(
                f"WarpConsistency: training views {missing} have no depth; the warp needs each "
                "training view's depth (scene depth files, or data.depth_model to estimate them)"
            )
        self._clips, self._stacked = views, None

    def _on(self, device: torch.device) -> tuple[Tensor, ...]:
        """The training views stacked on ``device`` (once per device): ``rgb [V, T, 3, H, W]``,
        ``depth [V, T, H, W]``, ``K [V, 3, 3]``, ``w2c [V, T, 4, 4]`` and first-frame centres ``[V, 3]``.
        Stacked so that the nearest views are picked on the device, without a host sync."""
        if not self._clips:
            raise RuntimeError("WarpConsistency: no training views (the fitter calls setup_views first)")
        if self._stacked is None or self._stacked[0].device != device:
            c = self._clips
            self._stacked = tuple(
                torch.stack(x).to(device)
                for x in (
                    [v.rgb for v in c], [v.depth for v in c], [v.K for v in c], [v.w2c for v in c],
                    [camera_centers(v.w2c[0]) for v in c],
                )
            )  # fmt: skip
        return self._stacked

    def targets(self, render: NovelViewRender) -> tuple[Tensor, Tensor]:
        """The warped target ``[T, 3, H, W]`` and where it exists ``[T, H, W]`` bool."""
        target, valid, _ = self._targets(render)
        return target, valid

    def _targets(self, render: NovelViewRender) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`targets` and the depth warped through ``[T, H, W]`` (0: none)."""
        rgb_v, depth_v, K_v, w2c_v, centers = self._on(render.rgb.device)
        T, _, H, W = render.rgb.shape
        frames = render.frames
        if frames is None and rgb_v.shape[1] != T:
            raise ValueError(
                f"WarpConsistency: the novel render has {T} frames and no frame indices, the "
                f"training views {rgb_v.shape[1]}"
            )
        if frames is not None:  # the training views' frames that were rendered
            f = frames.to(rgb_v.device)
            rgb_v, depth_v, w2c_v = (x.index_select(1, f) for x in (rgb_v, depth_v, w2c_v))
        with torch.no_grad():
            dist = (centers - camera_centers(render.w2c)).norm(dim=-1)
            near = dist.topk(min(self.views, len(centers)), largest=False).indices  # stays on the device
            picked = [near[j : j + 1] for j in range(len(near))]
            K = render.K.to(depth_v.dtype)
            w2c = render.w2c.to(depth_v.dtype).expand(T, 4, 4)
            if self.depth == "views":
                splats = [
                    forward_depth(depth_v.index_select(0, i)[0], K_v.index_select(0, i)[0],
                                  w2c_v.index_select(0, i)[0], K, w2c, H, W)
                    for i in picked
                ]  # fmt: skip
                z = torch.stack(splats)
                z = torch.where(z > 0, z, torch.inf).amin(0)  # the nearest surface any of them saw
                depth = torch.where(z.isfinite(), z, 0.0)
            else:
                depth = render.depth[:, 0].detach()
            acc = torch.zeros_like(render.rgb)
            count = torch.zeros_like(depth)
            for i in picked:
                rgb, ok = backward_warp(
                    depth, K, w2c, rgb_v.index_select(0, i)[0], depth_v.index_select(0, i)[0],
                    K_v.index_select(0, i)[0], w2c_v.index_select(0, i)[0], self.rel_tol,
                )  # fmt: skip
                acc += rgb
                count += ok
            valid = count > 0
            if self.depth == "render":
                valid &= render.alpha[:, 0].detach() > self.min_alpha
            return acc / count.clamp_min(1)[:, None], valid, depth

    def forward(self, render: NovelViewRender) -> Tensor:
        target, valid, depth = self._targets(render)
        err = (render.rgb - target).abs().sum(1)  # [T, H, W]
        loss = torch.where(valid, err, 0.0).sum() / (3 * valid.sum().clamp_min(1))
        if self.depth_weight:
            loss = loss + self.depth_weight * inverse_depth_l1(list(render.depth[:, 0]), list(depth))
        return loss
