"""Post-optimisation recovers known cameras, intrinsics and depth from synthetic pointmaps."""

from __future__ import annotations

import pytest
import torch

from fourdgen.data.synthetic import SyntheticConfig, make_scene
from fourdgen.geometry.postopt import recover_cameras
from fourdgen.geometry.projection import rebase_cameras, to_first_camera
from fourdgen.metrics.camera import ate
from fourdgen.metrics.depth import abs_rel


@pytest.fixture(scope="module")
def moving_camera_clip():
    """One view whose camera orbits 4 degrees per frame: a real trajectory to recover."""
    s = make_scene(
        SyntheticConfig(
            num_views=1, num_frames=6, height=32, width=40, camera_drift_deg=4.0, supersample=1, seed=2
        )
    )
    xyz = to_first_camera(s.xyz[0], s.w2c[0, 0])  # pointmaps in the first camera's frame
    w2c = rebase_cameras(s.w2c[0], s.w2c[0, 0])  # ground-truth cameras in that frame
    return xyz, w2c, s.depth[0], s.K[0]


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_recovers_cameras_intrinsics_and_depth(moving_camera_clip, noise):
    xyz, w2c_gt, depth_gt, K_gt = moving_camera_clip
    g = torch.Generator().manual_seed(0)
    scene_scale = xyz.reshape(-1, 3).std(0).mean()
    obs = xyz + noise * scene_scale * torch.randn(xyz.shape, generator=g)
    res = recover_cameras(obs, steps=150)
    path_len = (w2c_gt[1:, :3, 3] - w2c_gt[:-1, :3, 3]).norm(dim=-1).sum()
    err = ate(res.w2c, w2c_gt)
    rel_f = ((res.K[0, 0] - K_gt[0, 0]).abs() / K_gt[0, 0]).item()
    rel_depth = abs_rel(res.depth, depth_gt).item()
    tol = 1.0 if noise == 0 else 5.0
    assert err < 0.01 * tol * path_len, (err, path_len)
    assert rel_f < 0.01 * tol and rel_depth < 0.01 * tol, (rel_f, rel_depth)


def test_smoothness_term_damps_a_jittery_trajectory(moving_camera_clip):
    xyz, w2c_gt, _, _ = moving_camera_clip
    g = torch.Generator().manual_seed(1)
    # each frame's pointmap shifted by a random offset: cameras absorb it as jitter
    jitter = 0.05 * torch.randn(xyz.shape[0], 1, 1, 3, generator=g)
    obs = xyz + jitter
    rough = recover_cameras(obs, steps=150, smooth_weight=0.0)
    smooth = recover_cameras(obs, steps=150, smooth_weight=5.0)

    def wiggle(w2c):
        c = -(w2c[:, :3, :3].transpose(1, 2) @ w2c[:, :3, 3:])[..., 0]
        return (c[2:] - 2 * c[1:-1] + c[:-2]).norm(dim=-1).mean().item()

    assert wiggle(smooth.w2c) < 0.7 * wiggle(rough.w2c)
