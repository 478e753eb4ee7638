"""The initial Gaussians of a 4D fit: from a scene's points, or random points in the training frusta.

Returns gsplat-trainer tensors (log-scales, opacity logits, SH), plus, where the scene gives them,
each point's time (for temporal opacity: :mod:`~fourdgen.gaussians.temporal`) and its static flag.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from fourdgen.data.protocols import SceneInfo
from fourdgen.gaussians.container import Gaussians
from fourdgen.gaussians.temporal import initial_log_scale
from fourdgen.geometry.projection import unproject

SPLAT_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")
TEMPORAL_KEYS = ("t_mean", "t_scale")  # with temporal_opacity: time centre, log temporal std
STATIC_KEY = "static"  # 1 for Gaussians of points the scene classified static (not trainable)


def random_frustum_points(info: SceneInfo, n: int, depth: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """``n`` points ``[n, 3]`` with random colours ``[n, 3]``, uniform over the training cameras'
    images (first frame) at depths in ``depth`` (scene units). Seeded: the same scene gets the same
    points."""
    g = torch.Generator().manual_seed(0)
    views = torch.tensor(info.train_views)[torch.randint(len(info.train_views), (n,), generator=g)]
    uv = torch.rand(n, 2, generator=g) * torch.tensor([info.width, info.height])
    z = depth[0] + (depth[1] - depth[0]) * torch.rand(n, generator=g)
    pts = unproject(uv[:, None], z[:, None], info.K[views], info.w2c[views, 0])[:, 0]
    return pts, torch.rand(n, 3, generator=g)


def initial_splats(
    info: SceneInfo,
    sh_degree: int,
    init_opacity: float,
    temporal_opacity: bool = False,
    temporal_width: float = 1.0,
    random_points: int = 10_000,
    random_depth: tuple[float, float] = (1.0, 10.0),
) -> tuple[dict[str, Tensor], Tensor]:
    """The fit's initial tensors (:data:`SPLAT_KEYS`, then :data:`TEMPORAL_KEYS` with
    ``temporal_opacity`` and point times, then :data:`STATIC_KEY` where the scene classified its
    points) and the points ``[N, 3]`` they came from."""
    if info.points is not None:
        points, colors = info.points, info.colors
    else:
        points, colors = random_frustum_points(info, random_points, random_depth)
    g = Gaussians.from_points(points.float(), colors.float(), sh_degree=sh_degree, init_opacity=init_opacity)
    init = dict(
        zip(SPLAT_KEYS, (g.means, g.log_scales, g.quats, g.opacity_logits, g.sh0, g.shN), strict=True)
    )
    if temporal_opacity:
        if info.point_times is None or len(info.times) < 2:
            warnings.warn(
                "model.temporal_opacity: the initial points carry no times (data.init_frames: all "
                "gives them): the Gaussians do not fade in time",
                stacklevel=3,
            )
        else:
            init["t_mean"] = info.point_times.float()
            init["t_scale"] = torch.full_like(
                init["t_mean"], initial_log_scale(len(info.times), temporal_width)
            )
    if info.point_static is not None and info.points is not None:
        init[STATIC_KEY] = info.point_static.float()
    return init, points
