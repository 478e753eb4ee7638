"""Losses on novel views of a 4D Gaussian scene: the fitter's regulariser slot.

When a regulariser is due (``start_step``, ``every``), the fitter samples a camera on the
interpolated path between the training views (seeded by the step, so a resumed fit draws the same
cameras), renders the whole clip from it and hands a :class:`NovelViewRender` to each regulariser.
Flow-matching distillation (Full-4D, :mod:`fourdgen.gaussians.fmd`) plugs in here. Frozen models a
regulariser uses are loaded by it, never trained, and kept out of the fitter's checkpoint (the
fitter does not register regularisers as submodules); a resumed fit builds them again from the
recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


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
    ``depth [T, 1, H, W]``, ``K [3, 3]``, ``w2c [4, 4]``, ``times [T]`` in [0, 1], ``step``."""

    rgb: Tensor
    alpha: Tensor
    depth: Tensor | None
    K: Tensor
    w2c: Tensor
    times: Tensor
    step: int
    batch: Any = None


class NovelViewRegularizer(nn.Module):
    """Base class: ``forward(render) -> scalar loss``; the fitter adds ``weight * loss`` and logs it
    as ``train/reg_<name>``.

    Args:
        weight: loss weight.
        start_step: first global step at which it applies (e.g. after the coarse stage).
        every: it applies at every ``every``-th step from ``start_step`` on.

    ``needs_source``: the fitter passes the scene's :class:`SourceClip` to :meth:`setup`.
    """

    name = "novel_view"
    needs_source = False

    def __init__(self, weight: float = 1.0, start_step: int = 0, every: int = 1):
        super().__init__()
        if every < 1:
            raise ValueError(f"{type(self).__name__}.every: expected an integer >= 1, got {every}")
        self.weight, self.start_step, self.every = weight, start_step, every

    def due(self, step: int) -> bool:
        """Whether it applies at global step ``step``."""
        return step >= self.start_step and (step - self.start_step) % self.every == 0

    def setup(self, source: SourceClip | None) -> None:
        """Called once by the fitter before training, with the scene's source clip when
        ``needs_source`` (frozen models load lazily, on the first call, on the right device)."""

    def forward(self, render: NovelViewRender) -> Tensor:
        raise NotImplementedError


class CoverageRegularizer(NovelViewRegularizer):
    """Penalises see-through pixels on novel views (``mean(1 - alpha)``): scenes whose background
    is fully opaque should stay opaque between the training cameras."""

    name = "coverage"

    def forward(self, render: NovelViewRender) -> Tensor:
        return (1 - render.alpha).mean()
