"""The fit's initial Gaussians (fourdgen/gaussians/initialization.py)."""

from __future__ import annotations

import math

import pytest
import torch

from fourdgen.data.protocols import SceneInfo
from fourdgen.gaussians.initialization import SPLAT_KEYS, STATIC_KEY, initial_splats, random_frustum_points
from fourdgen.geometry.cameras import intrinsics_from_fov, look_at
from fourdgen.geometry.projection import project


def _info(points=True, T=4):
    K = intrinsics_from_fov(50.0, 32, 24).expand(3, 3, 3)
    eyes = torch.tensor([[0.0, 0.5, -4.0], [3.0, 0.5, -3.0], [-3.0, 0.5, -3.0]])
    w2c = look_at(eyes, torch.zeros(3, 3))[:, None].expand(3, T, 4, 4)
    pts = torch.randn(50, 3, generator=torch.Generator().manual_seed(0)) if points else None
    extra = {}
    if pts is not None:
        extra = dict(colors=torch.rand(50, 3), point_times=torch.rand(50), point_static=torch.rand(50) > 0.5)
    return SceneInfo(
        K=K, w2c=w2c, times=torch.linspace(0, 1, T), height=24, width=32, train_views=[0, 2],
        holdout_views=[1], points=pts, colors=extra.pop("colors", None), fps=8.0, **extra,
    )  # fmt: skip


def test_scene_points_become_gaussians_with_their_times_and_static_flags():
    info = _info()
    init, points = initial_splats(
        info, sh_degree=1, init_opacity=0.1, temporal_opacity=True, temporal_width=1.0
    )
    assert list(init)[: len(SPLAT_KEYS)] == list(SPLAT_KEYS) and torch.equal(points, info.points)
    assert torch.equal(init["means"], info.points)
    assert torch.allclose(torch.sigmoid(init["opacities"]), torch.full((50,), 0.1))
    assert torch.equal(init["t_mean"], info.point_times)
    assert torch.allclose(init["t_scale"].exp(), torch.full((50,), 1 / 3))  # one frame spacing of 4 frames
    assert torch.equal(init[STATIC_KEY], info.point_static.float())
    plain, _ = initial_splats(info, sh_degree=0, init_opacity=0.1)
    assert "t_mean" not in plain and plain["shN"].shape[1] == 0


def test_without_points_random_points_fill_the_training_frusta():
    info = _info(points=False)
    init, points = initial_splats(
        info, sh_degree=0, init_opacity=0.1, random_points=200, random_depth=(2.0, 5.0)
    )
    assert points.shape == (200, 3) and STATIC_KEY not in init
    again, _ = random_frustum_points(info, 200, (2.0, 5.0))
    assert torch.equal(points, again)  # seeded
    seen = torch.zeros(200, dtype=torch.bool)
    for v in info.train_views:
        uv, z = project(points[None], info.K[v : v + 1], info.w2c[v, :1])
        inside = (uv[0, :, 0] >= 0) & (uv[0, :, 0] <= 32) & (uv[0, :, 1] >= 0) & (uv[0, :, 1] <= 24)
        seen |= inside & (z[0] >= 2.0 - 1e-4) & (z[0] <= 5.0 + 1e-4)
    assert seen.all()


def test_temporal_opacity_without_point_times_warns():
    info = _info()
    info.point_times = None
    with pytest.warns(UserWarning, match="temporal_opacity"):
        init, _ = initial_splats(info, sh_degree=0, init_opacity=0.1, temporal_opacity=True)
    assert "t_mean" not in init and math.isfinite(float(init["scales"].sum()))
