"""Monocular depth front end: a tiny random Depth Anything checkpoint through DepthEstimator, the
least-squares depth alignment, per-view alignment to the projected source depth, MonocularDepth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DepthAnythingForDepthEstimation

from fourdgen.backbones.depth import DepthEstimator, save_tiny_depth_anything
from fourdgen.backbones.depth import tiny_depth_anything_config as _tiny_config
from fourdgen.batch import GridBatch
from fourdgen.components import build
from fourdgen.data.depth_providers import MonocularDepth
from fourdgen.data.synthetic import SyntheticConfig, make_scene
from fourdgen.errors import ConfigError
from fourdgen.geometry.align import align_depth
from fourdgen.geometry.cameras import camera_centers, focus_point
from fourdgen.geometry.depth_fusion import align_views_to_source, fuse_points


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions are all thread start-up: on a busy two-core runner two threads made one
    forward of the tiny model take ~2 s instead of ~10 ms."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_da(tmp_path_factory):
    return save_tiny_depth_anything(tmp_path_factory.mktemp("tiny-da"))


@pytest.fixture(scope="module")
def scene():
    cfg = SyntheticConfig(
        num_views=3, num_frames=3, height=24, width=32, layout="arc", arc_degrees=40, supersample=1
    )
    return make_scene(cfg)


def _grid_batch(scene, depth: bool) -> GridBatch:
    V, T = scene.depth.shape[:2]
    return GridBatch(
        rgb=scene.rgb.permute(0, 1, 4, 2, 3)[None] * 2 - 1,
        K=scene.K[None],
        w2c=scene.w2c[None],
        observed=torch.ones(1, V, T, dtype=torch.bool),
        times=scene.times[None],
        view_ids=torch.arange(V)[None],
        time_ids=torch.arange(T)[None],
        depth=scene.depth[None, :, :, None] if depth else None,
    ).validate()


# --- (a) DepthEstimator -------------------------------------------------------------------------


def test_estimator_shape_finite_deterministic(tiny_da):
    est = DepthEstimator(str(tiny_da), device="cpu", batch_size=3)
    assert est.space == "disparity"
    frames = torch.rand(4, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    # keep_aspect_ratio fits the width (42 / 32 is the smaller change), height to a multiple of 14.
    assert est.preprocess(frames).shape == (4, 3, 28, 42)
    out = est(frames)
    assert out.shape == (4, 24, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.std() > 0
    assert torch.equal(out, est(frames))
    whole = DepthEstimator(str(tiny_da), device="cpu", batch_size=4)(frames)  # one chunk vs 3 + 1
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-7)


def test_estimator_metric_checkpoint_is_depth(tmp_path):
    root = save_tiny_depth_anything(tmp_path / "metric", depth_estimation_type="metric", max_depth=20)
    assert DepthEstimator(str(root), device="cpu").space == "depth"


def test_estimator_errors_name_the_path(tmp_path, tiny_da):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="nowhere: depth checkpoint folder not found"):
        DepthEstimator(str(missing))
    with pytest.raises(ConfigError, match="not a transformers checkpoint"):
        DepthEstimator(str(tmp_path))
    other = tmp_path / "dino"
    _tiny_config().backbone_config.save_pretrained(other)
    with pytest.raises(ConfigError, match="'dinov2' is not a supported depth-estimation"):
        DepthEstimator(str(other))
    no_proc = tmp_path / "no-proc"
    DepthAnythingForDepthEstimation(_tiny_config()).save_pretrained(no_proc)
    with pytest.raises(ConfigError, match="no-proc: no image processor config"):
        DepthEstimator(str(no_proc))


# --- (b) align_depth ----------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["disparity", "depth"])
@pytest.mark.parametrize("mode", ["scale_shift", "scale"])
def test_align_depth_matches_numpy_lstsq(space, mode):
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(2, 3, 8, 10, generator=g, dtype=torch.float64) + 0.1
    ref = torch.rand(2, 3, 8, 10, generator=g, dtype=torch.float64) * 4 + 1
    valid = torch.rand(2, 3, 8, 10, generator=g) > 0.3
    ref[0, 0, :2] = 0.0  # unknown reference pixels never count, valid or not
    _, a, b = align_depth(pred, ref, valid, space, mode, return_params=True)
    use = (valid & (ref > 0)).numpy()
    x, y = pred.numpy()[use], ref.numpy()[use]
    y = 1 / y if space == "disparity" else y
    A = np.stack([x, np.ones_like(x)], 1) if mode == "scale_shift" else x[:, None]
    sol = np.linalg.lstsq(A, y, rcond=None)[0]
    np.testing.assert_allclose([float(a), float(b)], [sol[0], sol[1] if mode == "scale_shift" else 0.0])


def test_align_depth_recovers_affine_disparity():
    g = torch.Generator().manual_seed(2)
    depth = torch.rand(3, 12, 16, generator=g) * 4 + 1
    pred = 0.7 / depth + 0.05  # what a relative model predicts, up to its unknown affine map
    ref = torch.where(torch.rand(3, 12, 16, generator=g) > 0.8, depth, 0.0)  # sparse reference
    out, a, b = align_depth(pred, ref, ref > 0, "disparity", return_params=True)
    torch.testing.assert_close(out, depth, rtol=1e-5, atol=0)  # every pixel, not only the reference
    assert float(a) == pytest.approx(1 / 0.7) and float(b) == pytest.approx(-0.05 / 0.7, abs=1e-6)
    # A disparity that the fit maps to <= 0 is unknown depth.
    assert align_depth(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[0.0, 2.0, 1.0]])).tolist() == [
        [0.0, 2.0, 1.0]
    ]


def test_align_depth_scale_only_and_errors():
    depth = torch.linspace(1, 5, 20).reshape(4, 5)
    out, a, b = align_depth(2.5 * depth, depth, None, "depth", "scale", return_params=True)
    torch.testing.assert_close(out, depth)
    assert float(a) == pytest.approx(0.4) and float(b) == 0.0
    one = torch.zeros(4, 5, dtype=torch.bool)
    one[0, 0] = True
    assert align_depth(2.5 * depth, depth, one, "depth", "scale")[0, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs >= 2 valid reference pixels, got 1"):
        align_depth(depth, depth, one)
    with pytest.raises(ValueError, match="constant"):
        align_depth(torch.ones(4, 5), depth)


# --- (c) fusion ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source_view", [0, 1])
def test_align_views_to_source_recovers_true_depth(scene, source_view):
    V = scene.depth.shape[0]
    g = torch.Generator().manual_seed(3)
    alpha, beta = 0.5 + 2 * torch.rand(V, generator=g), 0.3 * torch.rand(V, generator=g)
    estimates = alpha[:, None, None, None] / scene.depth + beta[:, None, None, None]
    depth, report = align_views_to_source(
        estimates, "disparity", scene.K, scene.w2c, source_view, scene.depth[source_view]
    )
    assert torch.equal(depth[source_view], scene.depth[source_view])
    assert [r["view"] for r in report] == list(range(V))
    rel = (depth - scene.depth).abs() / scene.depth
    for v, r in enumerate(report):
        if v == source_view:
            assert r["a"] is None and r["b"] is None
            continue
        assert r["pixels"] >= 64 and r["rel_residual"] < 0.05
        assert rel[v].median() < 0.02
        # The fit inverts the estimate's affine map: a = 1 / alpha, b = -beta / alpha.
        assert r["a"] == pytest.approx(1 / alpha[v].item(), rel=0.02)
        assert r["b"] == pytest.approx(-beta[v].item() / alpha[v].item(), abs=0.01)


def test_align_views_to_source_too_few_pixels_names_the_view(scene):
    with pytest.raises(ValueError, match="view 1: the source view's depth covers"):
        align_views_to_source(
            1 / scene.depth, "disparity", scene.K, scene.w2c, 0, scene.depth[0], min_pixels=10**6
        )


def test_fuse_points_lifts_valid_pixels(scene):
    rgb = scene.rgb.permute(0, 1, 4, 2, 3)
    depth = scene.depth.clone()
    depth[1, 2, :4] = 0.0  # unknown pixels are dropped
    points, colors = fuse_points(depth, rgb, scene.K, scene.w2c)
    valid = depth > 0
    assert points.shape == colors.shape == (int(valid.sum()), 3)
    torch.testing.assert_close(points, scene.xyz[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(colors, scene.rgb[valid])
    p0, _ = fuse_points(depth, rgb, scene.K, scene.w2c, frames=2)
    assert p0.shape[0] == int(valid[:, 2].sum())


# --- (d) MonocularDepth -------------------------------------------------------------------------


def test_monocular_depth_without_reference_matches_rig_scale(tiny_da, scene):
    provider = MonocularDepth(str(tiny_da))
    assert build(provider.spec()).spec() == provider.spec()
    assert provider.spec()["init_args"] == {
        "path": str(tiny_da),
        "mode": "scale_shift",
        "dtype": "float32",
        "batch_size": 8,
    }
    b = _grid_batch(scene, depth=False)
    out = provider(b, view=1)
    B, V, T, H, W = b.shape
    assert out.shape == (B, T, H, W) and torch.isfinite(out).all() and (out >= 0).all()
    distance = (camera_centers(scene.w2c[1]) - focus_point(scene.w2c)).norm(dim=-1).median()
    assert distance == pytest.approx(4.0, rel=1e-3)  # the arc looks at its centre from radius 4
    assert out[out > 0].median() == pytest.approx(float(distance), rel=1e-4)


def test_monocular_depth_aligns_to_reference(tiny_da, scene):
    provider = MonocularDepth(str(tiny_da), mode="scale_shift")
    b = _grid_batch(scene, depth=True)
    out = provider(b, view=0)
    est = provider.estimator("cpu")
    expected = align_depth(est((b.rgb[0, 0] + 1) / 2), scene.depth[0], scene.depth[0] > 0, est.space)
    torch.testing.assert_close(out[0], expected)

    class Oracle:  # a depth model exact up to an affine map of disparity
        space, device = "disparity", torch.device("cpu")

        def __call__(self, frames):
            return 3.0 / scene.depth[2] + 0.2

    provider._estimator = Oracle()
    torch.testing.assert_close(provider(b, view=2)[0], scene.depth[2], rtol=1e-4, atol=0)
    # Without the reference, the shift-0 inversion keeps the oracle's (wrong) shift: only the
    # median is pinned, to the camera-to-focus distance.
    out = provider(_grid_batch(scene, depth=False), view=2)[0]
    assert out.median() == pytest.approx(4.0, rel=1e-3)


# --- (e) the fitter's initial cloud from a generated grid -----------------------------------------


def test_scene_frames_fuses_estimated_depth_of_views_without_depth(tiny_da, scene, tmp_path):
    """A generated grid has depth for its source view only: without a depth model the initial cloud
    comes from that view; with one, every view adds points aligned to the source's depth."""
    from fourdgen.data.scene_frames import SceneFramesDataModule
    from fourdgen.data.scene_writer import write_scene

    root = write_scene(
        tmp_path / "grid", scene.rgb, scene.K, scene.w2c, depth={0: scene.depth[0]}, extra={"source_view": 0}
    )
    plain = SceneFramesDataModule(scene=str(root), init_points=10**6, init_frames="all").scene_info()
    assert plain.source_view == 0
    assert len(plain.points) == int((scene.depth[0] > 0).sum())  # the source view's pixels only
    fused = SceneFramesDataModule(
        scene=str(root), init_points=10**6, init_frames="all", depth_model=str(tiny_da), depth_device="cpu"
    ).scene_info()
    assert len(fused.points) > len(plain.points) and torch.isfinite(fused.points).all()
    no_source = write_scene(tmp_path / "nosrc", scene.rgb, scene.K, scene.w2c, depth={0: scene.depth[0]})
    with pytest.raises(ValueError, match="source view"):
        SceneFramesDataModule(scene=str(no_source), depth_model=str(tiny_da)).scene_info()
