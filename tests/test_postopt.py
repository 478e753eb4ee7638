"""Post-optimisation recovers known cameras, intrinsics and depth from synthetic pointmaps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fourdgen.data.synthetic import SyntheticConfig, make_scene
from fourdgen.geometry.postopt import recover_cameras
from fourdgen.geometry.projection import rebase_cameras, to_first_camera
from fourdgen.metrics.camera import ate
from fourdgen.metrics.depth import abs_rel, depth_metrics


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


def _handmade_clip(T=3, H=10, W=14):
    """Pointmaps written out from the registration's model by hand: focal 1.2 W / 1.2 H, centred
    principal point (the official start), a camera that turns and moves, a curved depth surface."""
    from fourdgen.geometry.rotations import axis_angle_to_matrix

    f, c = torch.tensor([1.2 * W, 1.2 * H]), torch.tensor([W / 2, H / 2])
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    xyz, w2c, depth = [], [], []
    for t in range(T):
        R = axis_angle_to_matrix(torch.tensor([0.0, 0.03 * t, 0.01 * t]))  # camera-to-world
        centre = torch.tensor([0.06 * t, 0.0, 0.03 * t])
        d = 1.5 + 0.3 * torch.sin(3 * u / W + 0.2 * t) * torch.cos(2 * v / H)
        ray = torch.stack([(u - c[0]) / f[0], (v - c[1]) / f[1], torch.ones_like(u)], -1)
        xyz.append((d[..., None] * ray) @ R.T + centre)
        w2c.append(torch.eye(4))
        w2c[-1][:3, :3], w2c[-1][:3, 3] = R.T, -R.T @ centre
        depth.append(d)
    return torch.stack(xyz), torch.stack(w2c), torch.stack(depth), f


def test_4dnex_registration_recovers_a_handmade_clip():
    from fourdgen.geometry.registration import register_pointmaps

    torch.set_num_threads(1)  # tiny tensors: one thread is fastest (conftest restores the count)
    xyz, w2c_gt, depth_gt, f_gt = _handmade_clip()
    res = register_pointmaps(xyz, steps=500)
    T, H, W, _ = xyz.shape
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    K = res.K
    ray = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], -1)
    R, t = res.w2c[:, :3, :3], res.w2c[:, :3, 3]
    back = torch.einsum("tij,thwj->thwi", R.transpose(1, 2), res.depth[..., None] * ray - t[:, None, None])
    assert (back - xyz).norm(dim=-1).mean() < 5e-3  # the registered cameras and depth reproduce the clip
    path_len = (w2c_gt[1:, :3, 3] - w2c_gt[:-1, :3, 3]).norm(dim=-1).sum()
    assert ate(res.w2c, w2c_gt) < 0.1 * path_len
    # Narrow views leave a flat dolly-zoom direction (focal and distance together) that lr 5e-3
    # barely leaves: a few percent on focal, depth right up to the sequence's scale.
    assert ((torch.stack([K[0, 0], K[1, 1]]) - f_gt).abs() / f_gt).max() < 0.05
    assert depth_metrics(res.depth, depth_gt, align="median", per_image=False)["abs_rel"] < 0.01


def test_postopt_is_a_component_the_recipes_pick():
    """4DNeX's recipe registers as the official script does (Adam 5e-3, 1500 steps); One4D's keeps
    the global optimisation."""
    import yaml

    from fourdgen.components import build
    from fourdgen.geometry.postopt import One4DPostOpt
    from fourdgen.geometry.registration import FourDNeXRegistration

    def postopt(name):
        return build(
            yaml.safe_load(Path(f"lightning_configs/{name}").read_text())["model"]["init_args"]["postopt"]
        )

    reg = postopt("video/4dnex.yaml")
    assert isinstance(reg, FourDNeXRegistration) and (reg.steps, reg.lr) == (1500, 5e-3)
    assert isinstance(postopt("tiny/video.yaml"), FourDNeXRegistration)
    assert isinstance(postopt("video/one4d.yaml"), One4DPostOpt)
