"""Losses on novel views of a 4D Gaussian scene: the fitter's regulariser slot.

Every so many steps the fitter samples a camera on the interpolated path between the training
views, renders the whole clip from it and hands a :class:`NovelViewRender` to each regulariser.
Flow-matching distillation (Full-4D) plugs in here. Frozen models a regulariser uses are loaded
by it, never trained, and kept out of the fitter's checkpoint (the fitter does not register
regularisers as submodules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


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
    """

    name = "novel_view"

    def __init__(self, weight: float = 1.0, start_step: int = 0):
        super().__init__()
        self.weight, self.start_step = weight, start_step

    def forward(self, render: NovelViewRender) -> Tensor:
        raise NotImplementedError


class CoverageRegularizer(NovelViewRegularizer):
    """Penalises see-through pixels on novel views (``mean(1 - alpha)``): scenes whose background
    is fully opaque should stay opaque between the training cameras."""

    name = "coverage"

    def forward(self, render: NovelViewRender) -> Tensor:
        return (1 - render.alpha).mean()
