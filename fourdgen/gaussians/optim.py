"""Learning rates of a 4D Gaussian fit, and the optimizer views gsplat's strategies need.

One Adam with a param group per Gaussian attribute (and for the deformation field) keeps
Lightning's automatic optimisation (one optimizer, one step, one LR scheduler). gsplat's
densification expects ``{name: optimizer with exactly one param group}``: :class:`GroupView`
presents one group of the shared Adam that way, so gsplat's parameter surgery edits the real
group and the real state in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch.optim import Optimizer


@dataclass
class LearningRates:
    """Per-group learning rates (4DGaussians defaults). ``means``, ``deformation`` and ``grid`` are
    multiplied by the scene scale (camera extent), as 4DGaussians does, and decay exponentially to
    their ``*_final`` values over ``max_steps``; the deformation MLP and the HexPlane count from
    the start of the fine stage."""

    means: float = 1.6e-4
    means_final: float = 1.6e-6
    scales: float = 5e-3
    quats: float = 1e-3
    opacities: float = 5e-2
    sh0: float = 2.5e-3
    shN: float = 2.5e-3 / 20
    deformation: float = 1.6e-4
    deformation_final: float = 1.6e-5
    grid: float = 1.6e-3
    grid_final: float = 1.6e-4
    t_mean: float = 1e-4  # temporal_opacity's time centres (time runs over [0, 1]) ...
    t_scale: float = 1e-2  # ... and log widths (Spacetime Gaussians' rates)
    # Widths held at their initial value until this step: while they are wide, a Gaussian is
    # seen at its neighbour frames too and the deformation must carry it there (issue 17)
    t_scale_start: int = 0
    max_steps: int = 20_000

    def initial(self, name: str, scene_scale: float) -> float:
        """Learning rate of group ``name`` (a field without ``_final``) at step 0: times
        ``scene_scale`` for ``means``, ``deformation`` and ``grid``."""
        return getattr(self, name) * (scene_scale if name in _SCENE_SCALED else 1)

    def factor(self, name: str, fine_start: int = 0) -> Callable[[int], float]:
        """Multiplier of :meth:`initial`'s rate at a step (a ``LambdaLR`` lambda) for group ``name``.

        ``means``: ``exp_decay(step, means, means_final, max_steps) / means``; ``deformation`` and
        ``grid``: the same decay counted from ``fine_start`` (constant before it); the others 1.
        Returns a plain function (``LambdaLR`` keeps callable objects' state in its checkpoints,
        not functions').
        """
        if name == "means":
            return lambda s: exp_decay(s, self.means, self.means_final, self.max_steps) / self.means
        if name in ("deformation", "grid"):
            init, final = getattr(self, name), getattr(self, f"{name}_final")
            return lambda s: exp_decay(max(s - fine_start, 0), init, final, self.max_steps) / init
        if name == "t_scale" and self.t_scale_start > 0:
            start = self.t_scale_start
            return lambda s: float(s >= start)
        return lambda s: 1.0


_SCENE_SCALED = ("means", "deformation", "grid")


def exp_decay(step: int, init: float, final: float, max_steps: int) -> float:
    """Log-linear interpolation from ``init`` to ``final`` over ``max_steps`` (3DGS's schedule)."""
    if init <= 0:
        return 0.0
    s = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return math.exp(math.log(init) * (1 - s) + math.log(max(final, 1e-20)) * s)


class GroupView:
    """One param group of ``optimizer`` seen as a single-group optimizer (for gsplat's ops)."""

    def __init__(self, optimizer: Optimizer, index: int):
        self.optimizer, self.index = optimizer, index

    @property
    def param_groups(self) -> list[dict]:
        return [self.optimizer.param_groups[self.index]]

    @property
    def state(self):
        return self.optimizer.state


def group_views(optimizer: Optimizer, names: list[str]) -> dict[str, GroupView]:
    """Views for the groups whose ``name`` entry is in ``names``."""
    return {
        g["name"]: GroupView(optimizer, i)
        for i, g in enumerate(optimizer.param_groups)
        if g.get("name") in names
    }
