"""4DNeX pointmap normalisation against plain per-frame reference computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fourdgen.geometry.pointmaps import (
    denormalize_latents,
    denormalize_pointmaps,
    guided_mask,
    latent_stats,
    normalize_pointmaps,
    renormalize_latents,
    xyz_condition_grid,
)
from fourdgen.geometry.projection import to_first_camera


def test_normalize_matches_numpy_reference(tiny_synthetic):
    s = tiny_synthetic
    xyz = to_first_camera(s.xyz[0], s.w2c[0, 0])  # [T, H, W, 3] in camera 0 at t=0
    out, norm = normalize_pointmaps(xyz)
    assert out.abs().max() <= 1 + 1e-5 and out.abs().max() > 0.99
    ref = []
    a = xyz.reshape(xyz.shape[0], -1, 3).double().numpy()
    lo, hi = np.percentile(a, 2, axis=1), np.percentile(a, 98, axis=1)  # [T, 3]
    c = (lo + hi) / 2
    scale = np.maximum(np.abs(hi - c), np.abs(lo - c)).max()
    for t in range(a.shape[0]):
        ref.append((np.clip(a[t], lo[t], hi[t]) - c[t]) / scale)
    np.testing.assert_allclose(out.reshape(len(ref), -1, 3).numpy(), np.stack(ref), atol=1e-4)
    # inverse: exact inside the clip box
    back = denormalize_pointmaps(out, norm)
    inside = ((xyz >= norm.lo[:, None, None]) & (xyz <= norm.hi[:, None, None])).all(-1)
    torch.testing.assert_close(back[inside], xyz[inside], atol=1e-4, rtol=1e-5)


def test_global_centre_and_valid_mask():
    torch.manual_seed(0)
    xyz = torch.randn(3, 8, 8, 3) + torch.tensor([0.0, 0, 5])
    xyz[:, 0, 0] = 1e6  # an invalid point far away must not move the percentiles
    valid = torch.ones(3, 8, 8, dtype=torch.bool)
    valid[:, 0, 0] = False
    out, norm = normalize_pointmaps(xyz, valid, center="global")
    assert torch.allclose(norm.centers[0], norm.centers[1]) and norm.hi[:, 2].max() < 10
    with pytest.raises(ValueError, match="center"):
        normalize_pointmaps(xyz, center="median")


def test_condition_grid_is_the_official_uniform_pointmap():
    """4DNeX's ``generate_uniform_pointmap`` (x, y linspaces; z = 1 - linspace(0, 1, H) per row,
    each mapped to [0, 1]) followed by ``* 2 - 1``, written out as a loop."""
    H, W = 5, 7
    ref = torch.empty(H, W, 3)
    for r in range(H):
        for c in range(W):
            x01, y01 = c / (W - 1), r / (H - 1)  # (linspace(-1, 1) + 1) / 2
            z01 = 1 - r / (H - 1)  # already spans [0, 1]: the min / ptp rescale keeps it
            ref[r, c] = torch.tensor([x01, y01, z01]) * 2 - 1
    torch.testing.assert_close(xyz_condition_grid(H, W), ref)
    assert xyz_condition_grid(H, W)[:, 0, 2].tolist() == [1.0, 0.5, 0.0, -0.5, -1.0]  # top 1, bottom -1


def test_condition_grid_mask_and_latent_renorm():
    g = xyz_condition_grid(4, 5)
    assert g.shape == (4, 5, 3)
    assert g[0, 0].tolist() == [-1.0, -1.0, 1.0] and g[-1, -1, :2].tolist() == [1.0, 1.0]
    assert guided_mask(3).tolist() == [[1.0, 0.5], [0.0, 0.0], [0.0, 0.0]]
    z = torch.randn(2, 16, 3, 4, 4) * 1.7 - 0.13
    torch.testing.assert_close(denormalize_latents(renormalize_latents(z)), z)
    shift, scale = latent_stats(z)
    w = renormalize_latents(z, shift, scale)
    assert abs(w.mean().item()) < 1e-5 and abs(w.std().item() - 1) < 1e-5


def test_one4d_normalisation_keeps_one_first_camera_frame():
    """One4D (section 4.1): pointmaps in the first frame's camera as one global frame, then into
    [-1, 1]: one centre and one scale for the clip (numpy reference). Cameras recovered from such
    pointmaps follow the true trajectory; 4DNeX's per-frame centres bias them."""
    import yaml

    from fourdgen.components import build
    from fourdgen.data.synthetic import SyntheticConfig, make_scene
    from fourdgen.geometry.pointmaps import PointmapNormalization
    from fourdgen.geometry.postopt import recover_cameras
    from fourdgen.geometry.projection import rebase_cameras
    from fourdgen.metrics.camera import ate

    s = make_scene(
        SyntheticConfig(num_views=1, num_frames=5, height=24, width=32, camera_drift_deg=6, seed=2)
    )
    xyz, w2c0 = s.xyz[0], s.w2c[0, 0]
    out, norm = PointmapNormalization(center="global")(xyz, w2c0)
    a = xyz.reshape(len(xyz), -1, 3).double().numpy() @ w2c0[:3, :3].double().numpy().T
    a = a + w2c0[:3, 3].double().numpy()  # first camera's frame by hand
    lo, hi = np.percentile(a, 2, axis=1), np.percentile(a, 98, axis=1)
    c = (lo.min(0) + hi.max(0)) / 2
    scale = np.maximum(np.abs(hi - c), np.abs(lo - c)).max()
    ref = np.stack([(np.clip(a[t], lo[t], hi[t]) - c) / scale for t in range(len(a))])
    np.testing.assert_allclose(out.reshape(ref.shape).numpy(), ref, atol=1e-4)

    gt = rebase_cameras(s.w2c[0], w2c0)
    per_frame, _ = PointmapNormalization()(xyz, w2c0)
    err_global = ate(recover_cameras(out, steps=60).w2c, gt)
    err_per_frame = ate(recover_cameras(per_frame, steps=60).w2c, gt)
    path = (gt[1:, :3, 3] - gt[:-1, :3, 3]).norm(dim=-1).sum()
    assert err_global < 0.02 * path and err_per_frame > 2 * err_global, (err_global, err_per_frame, path)

    def recipe_norm(name):
        args = yaml.safe_load(Path(f"lightning_configs/{name}").read_text())["model"]["init_args"]
        return build(args.get("pointmap_norm")) or PointmapNormalization()

    for name, center in [("video/one4d.yaml", "global"), ("tiny/one4d.yaml", "global")]:
        assert recipe_norm(name).center == center, name
    for name in ("video/4dnex.yaml", "tiny/video.yaml"):
        assert recipe_norm(name).center == "per_frame", name
