"""Synthetic scenes: exact geometry, real texture, real motion, determinism."""

from __future__ import annotations

import json

import pytest
import torch

from fourdgen.data.scene import read_scene
from fourdgen.data.synthetic import SyntheticConfig, main, make_scene


def _project(x, K, w2c):
    """Plain pinhole projection (independent of fourdgen.geometry): x [..., 3] -> uv, z."""
    cam = x @ w2c[:3, :3].T + w2c[:3, 3]
    uvw = cam @ K.T
    return uvw[..., :2] / uvw[..., 2:], cam[..., 2]


def test_pointmaps_reproject_to_pixel_centres(tiny_synthetic):
    s = tiny_synthetic
    H, W = s.depth.shape[-2:]
    v_, u_ = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    for v in range(s.K.shape[0]):
        for t in (0, s.depth.shape[1] - 1):
            uv, z = _project(s.xyz[v, t], s.K[v], s.w2c[v, t])
            assert (uv[..., 0] - u_).abs().max() < 1e-3 and (uv[..., 1] - v_).abs().max() < 1e-3
            assert (z - s.depth[v, t]).abs().max() < 1e-4


def test_cross_view_consistency(tiny_synthetic):
    """A point seen by view 0 and visible in view 1 lands on view 1's surface there."""
    s = tiny_synthetic
    t = 2
    H, W = s.depth.shape[-2:]
    pts = s.xyz[0, t].reshape(-1, 3)
    uv, z = _project(pts, s.K[1], s.w2c[1, t])
    col, row = uv[:, 0].floor().long(), uv[:, 1].floor().long()
    inside = (col >= 0) & (col < W) & (row >= 0) & (row < H) & (z > 0)
    col, row, z, pts = col[inside], row[inside], z[inside], pts[inside]
    d1 = s.depth[1, t, row, col]
    visible = (z - d1).abs() < 0.02 * d1
    assert visible.sum() > 100
    # Nearest-pixel lookup: the surface point there is within one pixel footprint.
    err = (s.xyz[1, t, row, col][visible] - pts[visible]).norm(dim=-1)
    footprint = 2.0 * d1[visible] / s.K[1, 0, 0]
    assert (err < footprint).float().mean() > 0.97


def test_real_texture_and_motion(tiny_synthetic):
    s = tiny_synthetic
    rgb = s.rgb  # [V, T, H, W, 3]
    assert rgb.std() > 0.1
    grad = (rgb[..., 1:, :] - rgb[..., :-1, :]).abs().mean()
    assert grad > 0.02, "scenes must have texture, not flat colours"
    moving = s.mask[:, 1:] > 0
    diff = (rgb[:, 1:] - rgb[:, :-1]).abs().amax(-1)
    # Static cameras: the background near objects changes only where objects move over it.
    assert diff[moving].mean() > 0.05
    assert s.mask[:, 0].ne(s.mask[:, -1]).float().mean() > 0.01
    assert (s.centers - s.centers[:, :1]).norm(dim=-1).max() > 0.3
    # The background (dome + ground) is static: unchanged where no object is, at both times.
    bg = (s.mask[:, 1:] == 0) & (s.mask[:, :-1] == 0)
    assert diff[bg].max() < 1e-5


def test_deterministic_and_seeded():
    cfg = SyntheticConfig(num_views=2, num_frames=2, height=16, width=16, supersample=1)
    a, b = make_scene(cfg), make_scene(cfg)
    assert torch.equal(a.rgb, b.rgb) and torch.equal(a.depth, b.depth)
    c = make_scene(SyntheticConfig(num_views=2, num_frames=2, height=16, width=16, supersample=1, seed=1))
    assert not torch.equal(a.rgb, c.rgb)


def test_moving_cameras_and_arc_layout():
    s = make_scene(
        SyntheticConfig(
            num_views=3, num_frames=3, height=16, width=16, layout="arc", camera_drift_deg=5.0, supersample=1
        )
    )
    assert not torch.allclose(s.w2c[:, 0], s.w2c[:, 1])
    uv, z = _project(s.xyz[2, 2], s.K[2], s.w2c[2, 2])
    assert (z - s.depth[2, 2]).abs().max() < 1e-4


def test_cli_writes_scene(tmp_path):
    main(
        [
            "--out",
            str(tmp_path / "x"),
            "--scene.num_views",
            "2",
            "--scene.num_frames",
            "3",
            "--scene.height",
            "16",
            "--scene.width",
            "24",
            "--scene.seed",
            "7",
        ]
    )
    s = read_scene(tmp_path / "x")
    assert (s.num_views, s.num_frames, s.height, s.width) == (2, 3, 16, 24)
    assert json.loads((tmp_path / "x/scene.json").read_text())["synthetic"]["seed"] == 7


@pytest.mark.parametrize("value", ["-2", "0"])
def test_cli_refuses_impossible_scenes_in_one_line(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "s"), "--scene.num_views", value])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert f"synthetic.num_views: expected an integer >= 1, got {value}" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()
