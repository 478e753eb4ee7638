"""Metrics (image, depth, camera), similarity alignment and media logging."""

from __future__ import annotations

import math
import os
import sys
import warnings

import imageio.v2 as iio2
import imageio.v3 as iio
import lpips
import pytest
import torch
import torchvision
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fourdgen.metrics.image as image_mod
from fourdgen.callbacks import log_images, log_video, save_video_mp4
from fourdgen.geometry.align import align_cameras, apply_similarity, procrustes, umeyama
from fourdgen.geometry.cameras import camera_centers, invert_rigid, look_at, make_rigid
from fourdgen.metrics import (
    LPIPS,
    ImageMetrics,
    abs_rel,
    align_depth_median,
    align_depth_scale_shift,
    ate,
    camera_metrics,
    delta_acc,
    depth_metrics,
    pooled_psnr,
    psnr,
    rpe,
    ssim,
)


def _rotation(g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.linalg.det(q) > 0 else -q


def _rz(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _trajectory(n: int = 10) -> torch.Tensor:
    """A wobbly orbit of ``n`` OpenCV cameras looking at the origin, w2c ``[n, 4, 4]`` float64."""
    th = torch.linspace(0, 1.5 * math.pi, n, dtype=torch.float64)
    eye = torch.stack([3 * torch.cos(th), 0.5 * torch.sin(3 * th), 3 * torch.sin(th)], -1)
    w2c = look_at(eye, torch.zeros(n, 3)).double()
    # look_at works in float32: re-orthonormalise so the poses are rigid to float64 precision
    U, _, Vh = torch.linalg.svd(w2c[:, :3, :3])
    return invert_rigid(make_rigid((U @ Vh).transpose(-1, -2), eye))


# ----------------------------------------------------------------------------- image metrics


@pytest.fixture(scope="module")
def random_lpips() -> LPIPS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LPIPS(allow_random_backbone=True)


def test_psnr_constant_offset():
    target = torch.rand(2, 3, 16, 16) * 0.8 + 0.1
    assert psnr(target + 0.1, target).item() == pytest.approx(20.0, abs=1e-3)  # MSE 0.01
    assert psnr(target + 0.1, target, reduction="none").shape == (2,)
    assert psnr(target * 255 + 25.5, target * 255, data_range=255.0).item() == pytest.approx(20.0, abs=1e-3)


def test_pooled_psnr_matches_a_plain_reference():
    """MSE pooled over all (or the masked) elements, not per image; clamped at 1e-10."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(2, 3, 5, 7, generator=g), torch.rand(2, 3, 5, 7, generator=g)
    mask = torch.rand(2, 1, 5, 7, generator=g).expand_as(pred) > 0.6
    p, t, m = pred.double().flatten().tolist(), target.double().flatten().tolist(), mask.flatten().tolist()
    sq = [(a - b) ** 2 for a, b in zip(p, t, strict=True)]
    ref_all = -10 * math.log10(sum(sq) / len(sq))
    masked = [e for e, keep in zip(sq, m, strict=True) if keep]
    ref_masked = -10 * math.log10(sum(masked) / len(masked))
    assert pooled_psnr(pred, target).item() == pytest.approx(ref_all, abs=1e-4)
    assert pooled_psnr(pred, target, mask=mask).item() == pytest.approx(ref_masked, abs=1e-4)
    assert pooled_psnr(pred * 255, target * 255, data_range=255.0).item() == pytest.approx(ref_all, abs=1e-3)
    assert pooled_psnr(pred, pred).item() == pytest.approx(100.0)  # identical: 100 dB, not inf
    per_image = psnr(pred, target)  # the per-image mean differs from the pooled one
    assert abs(per_image.item() - ref_all) > 1e-3
    one = pred[:1].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # any layout
    assert pooled_psnr(one, target[:1]).item() == pytest.approx(psnr(pred[:1], target[:1]).item(), abs=1e-4)


def test_ssim_identical_and_noisy():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert ssim(noisy, x).item() < 0.9


def test_lpips_identical_zero_different_positive(random_lpips):
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(random_lpips.score(x, x), torch.zeros(2))
    assert (random_lpips.score(x, torch.rand_like(x)) > 0).all()
    # [-1, 1] inputs with normalize=False give the same values as [0, 1] with normalize=True
    y = torch.rand_like(x)
    random_lpips.normalize = False
    try:
        native = random_lpips.score(x * 2 - 1, y * 2 - 1)
    finally:
        random_lpips.normalize = True
    torch.testing.assert_close(native, random_lpips.score(x, y))
    # the Metric accumulates a mean over images
    random_lpips.reset()
    random_lpips.update(x, y)
    random_lpips.update(x, x)
    assert random_lpips.compute().item() == pytest.approx(random_lpips.score(x, y).sum().item() / 4, rel=1e-5)


def test_lpips_requires_weights_or_explicit_random(monkeypatch):
    with pytest.raises(ValueError, match="backbone_weights"):
        LPIPS()
    with pytest.raises(ValueError, match="backbone_weights"):
        ImageMetrics()
    monkeypatch.setattr(image_mod, "_warned_random_backbone", False)
    with pytest.warns(UserWarning, match="RANDOM backbone"):
        LPIPS(allow_random_backbone=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        LPIPS(allow_random_backbone=True)


def test_lpips_backbone_weights_roundtrip(tmp_path):
    tv = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(tv.state_dict(), path)
    metric = LPIPS(net="alex", backbone_weights=str(path))

    sd = tv.state_dict()
    feature_keys = {k for k in sd if k.startswith("features.")}
    backbone = dict(metric.net.net.named_parameters())
    assert len(backbone) == len(feature_keys) == 10
    for name, p in backbone.items():  # "slice2.3.weight" holds torchvision's "features.3.weight"
        assert torch.equal(p, sd["features." + name.split(".", 1)[1]]), name
    # calibrated linear layers come from the lpips package, scaling constants are intact
    lin = torch.load(
        os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/alex.pth"), "cpu", weights_only=True
    )
    for k, v in lin.items():
        assert torch.equal(metric.net.get_parameter(k), v)
    torch.testing.assert_close(metric.net.scaling_layer.scale.flatten(), torch.tensor([0.458, 0.448, 0.450]))
    x = torch.rand(1, 3, 64, 64)
    assert metric.score(x, x).item() == 0 and metric.score(x, 1 - x).item() > 0
    # checkpoints of a module holding the metric stay free of the frozen network
    assert not any("slice" in k for k in metric.state_dict())

    # a features-only state dict works too; a mismatched backbone is refused
    feats = tmp_path / "features.pth"
    torch.save(tv.features.state_dict(), feats)
    assert torch.equal(LPIPS(backbone_weights=str(feats)).net.net.slice5[0].weight, tv.features[10].weight)
    with pytest.raises(ValueError, match="missing"):
        LPIPS(net="vgg", backbone_weights=str(feats))


def test_image_metrics_keys(random_lpips):
    m = ImageMetrics(lpips_net=None)
    m.lpips = random_lpips
    x = torch.rand(2, 3, 64, 64)
    out = m(x * 0.9, x)
    assert set(out) == {"psnr", "ssim", "lpips"}
    assert all(v.ndim == 0 for v in out.values())
    assert set(ImageMetrics(lpips_net=None)(x, x)) == {"psnr", "ssim"}


# ----------------------------------------------------------------------------- depth metrics


def test_abs_rel_and_delta_hand_made():
    gt = torch.tensor([[1.0, 2.0], [4.0, 0.0]])  # 0 is invalid
    pred = torch.tensor([[1.5, 2.0], [2.0, 100.0]])
    assert abs_rel(pred, gt).item() == pytest.approx(1 / 3)  # (0.5 + 0 + 0.5) / 3
    assert delta_acc(pred, gt).item() == pytest.approx(1 / 3)  # ratios 1.5, 1, 2
    mask = torch.tensor([[True, True], [False, True]])
    assert abs_rel(pred, gt, mask=mask).item() == pytest.approx(0.25)
    assert delta_acc(pred, gt, threshold=1.6, mask=mask).item() == pytest.approx(1.0)
    gt_nan = torch.tensor([[1.0, float("nan")], [float("inf"), -1.0]])
    assert abs_rel(torch.full((2, 2), 2.0), gt_nan).item() == pytest.approx(1.0)
    assert delta_acc(-gt, gt).item() == 0  # negative predictions never count as accurate
    # batched: per-image values, averaged
    b_pred, b_gt = torch.stack([pred, gt.clamp_min(1)]), torch.stack([gt, gt.clamp_min(1)])
    assert abs_rel(b_pred, b_gt, reduction="none").shape == (2,)
    assert abs_rel(b_pred, b_gt).item() == pytest.approx(1 / 6)


def test_depth_alignment_makes_scaled_prediction_perfect():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 8, 9, generator=g) * 5 + 0.5
    gt[0, 0, 0] = 0.0  # invalid pixel carrying a garbage prediction below
    scales = torch.tensor([0.3, 2.0, 7.5])[:, None, None]
    pred = gt * scales
    pred[0, 0, 0] = 1e6
    aligned = align_depth_median(pred, gt)
    assert abs_rel(aligned, gt).item() < 1e-6
    assert depth_metrics(pred, gt, align="median") == pytest.approx({"abs_rel": 0.0, "delta1": 1.0}, abs=1e-6)
    assert depth_metrics(pred, gt, align="none")["delta1"] < 0.5

    affine = gt * scales + torch.tensor([1.0, -0.2, 4.0])[:, None, None]
    assert abs_rel(align_depth_scale_shift(affine, gt), gt).item() < 1e-6
    res = depth_metrics(affine, gt, align="scale_shift")
    assert res == pytest.approx({"abs_rel": 0.0, "delta1": 1.0}, abs=1e-6)
    assert depth_metrics(affine, gt, align="median")["abs_rel"] > 1e-3
    # per-sequence alignment: one scale for all frames cannot undo per-frame scales
    assert depth_metrics(pred, gt, per_image=False)["abs_rel"] > 0.1
    assert depth_metrics(gt * 3, gt, per_image=False)["abs_rel"] < 1e-6


# ----------------------------------------------------------------------------- alignment


def test_umeyama_recovers_similarity():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        src = torch.randn(20, 3, generator=g, dtype=torch.float64)
        R_true, t_true = _rotation(g), torch.randn(3, generator=g, dtype=torch.float64)
        s_true = float(torch.rand(1, generator=g)) * 3 + 0.1
        dst = apply_similarity(src, s_true, R_true, t_true)
        s, R, t = umeyama(src, dst)
        assert s.item() == pytest.approx(s_true, abs=1e-6)
        torch.testing.assert_close(R, R_true, atol=1e-6, rtol=0)
        torch.testing.assert_close(t, t_true, atol=1e-6, rtol=0)
        s1, R1, t1 = procrustes(src, apply_similarity(src, 1.0, R_true, t_true))
        assert s1.item() == 1.0
        torch.testing.assert_close(R1, R_true, atol=1e-6, rtol=0)
    # float32 in, float32 out
    assert umeyama(src.float(), dst.float())[1].dtype == torch.float32


def test_umeyama_reflections():
    g = torch.Generator().manual_seed(1)
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    # 3D point cloud and its mirror image: the best fit must still be a proper rotation
    src = torch.randn(30, 3, generator=g, dtype=torch.float64)
    _, R, _ = umeyama(src, src @ mirror)
    assert torch.linalg.det(R).item() == pytest.approx(1.0)
    # planar points mirrored in-plane: a 180 degree rotation fits exactly, the reflection as well;
    # the proper rotation must win
    plane = torch.cat([torch.randn(30, 2, generator=g, dtype=torch.float64), torch.zeros(30, 1)], -1)
    dst = plane * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    s, R, t = umeyama(plane, dst)
    assert torch.linalg.det(R).item() == pytest.approx(1.0)
    torch.testing.assert_close(apply_similarity(plane, s, R, t), dst, atol=1e-9, rtol=0)


def test_align_cameras_undoes_similarity():
    w2c = _trajectory()
    g = torch.Generator().manual_seed(2)
    R, t, s = _rotation(g), torch.randn(3, generator=g, dtype=torch.float64), 0.37
    moved = torch.stack([_similarity_w2c_ref(T, s, R, t) for T in w2c])
    torch.testing.assert_close(camera_centers(moved), apply_similarity(camera_centers(w2c), s, R, t))
    torch.testing.assert_close(align_cameras(moved, w2c), w2c, atol=1e-6, rtol=0)


def _similarity_w2c_ref(w2c: torch.Tensor, s: float, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Independent construction: rotate the camera's axes with the world, move its centre."""
    c2w = invert_rigid(w2c)
    return invert_rigid(make_rigid(R @ c2w[:3, :3], s * R @ c2w[:3, 3] + t))


# ----------------------------------------------------------------------------- camera metrics


def test_ate_similarity_invariant_and_perturbation_rms():
    gt = _trajectory(12)
    g = torch.Generator().manual_seed(3)
    R, t = _rotation(g), torch.randn(3, generator=g, dtype=torch.float64)
    pred = torch.stack([_similarity_w2c_ref(T, 2.5, R, t) for T in gt])
    assert ate(pred, gt).item() < 1e-6
    assert ate(pred.float(), gt.float()).item() < 1e-4

    # perturbation with zero mean and zero correlation with the centres leaves the best rigid
    # alignment at identity, so ATE is exactly the perturbation's RMS
    c = camera_centers(gt)
    A = torch.cat([torch.ones(12, 1, dtype=torch.float64), c - c.mean(0)], -1)
    e = 0.05 * torch.randn(12, 3, generator=g, dtype=torch.float64)
    e = e - A @ torch.linalg.lstsq(A, e).solution
    pred = gt.clone()
    pred[:, :3, 3] = -(pred[:, :3, :3] @ (c + e)[..., None])[..., 0]  # t = -R C
    rms = e.square().sum(-1).mean().sqrt().item()
    assert ate(pred, gt, with_scale=False).item() == pytest.approx(rms, rel=1e-6)
    assert ate(pred, gt).item() == pytest.approx(rms, rel=0.05)


def test_rpe_zero_and_known_rotation():
    gt = _trajectory(10)
    rpe_t, rpe_r = rpe(gt.clone(), gt)
    assert rpe_t.item() < 1e-9 and rpe_r.item() < 1e-6
    # turn the last camera by 5 degrees about its optical axis (centre fixed): one pair of nine
    # has a 5 degree error, the others none -> RMSE 5 / 3
    c2w = invert_rigid(gt)
    c2w[-1, :3, :3] = c2w[-1, :3, :3] @ _rz(5.0)
    pred = invert_rigid(c2w)
    rpe_t, rpe_r = rpe(pred, gt)
    assert rpe_r.item() == pytest.approx(5.0 / 3.0, abs=1e-6)
    assert rpe_t.item() < 1e-9
    assert rpe(pred[-2:], gt[-2:])[1].item() == pytest.approx(5.0, abs=1e-6)
    out = camera_metrics(pred, gt)
    assert set(out) == {"ate", "rpe_t", "rpe_r"}
    assert out["ate"] < 1e-9 and out["rpe_r"] == pytest.approx(5.0 / 3.0, abs=1e-6)


# ----------------------------------------------------------------------------- media


def test_log_images_and_video_to_tensorboard(tmp_path):
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    assert log_images(logger, "val/images", torch.rand(3, 3, 16, 20), step=1)
    assert log_video(logger, "val/video", torch.rand(4, 3, 16, 20), step=1, fps=8)
    assert log_video([CSVLogger(str(tmp_path)), logger], "val/videos", torch.rand(2, 5, 3, 16, 20), step=2)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert {"val/images", "val/video", "val/videos"} <= set(acc.Tags()["images"])
    gif = iio.imread(acc.Images("val/video")[0].encoded_image_string, index=None)
    assert gif.shape[:3] == (4, 16, 20)
    assert iio.imread(acc.Images("val/videos")[0].encoded_image_string, index=None).shape[0] == 5
    # no TensorBoard: silently skipped
    assert not log_images(None, "x", torch.rand(1, 3, 8, 8), step=0)
    assert not log_video(CSVLogger(str(tmp_path)), "x", torch.rand(2, 3, 8, 8), step=0)


def test_save_video_mp4(tmp_path):
    path = tmp_path / "out" / "video.mp4"
    save_video_mp4(path, torch.rand(6, 32, 48, 3), fps=10)
    with iio2.get_reader(str(path), format="FFMPEG") as reader:
        frames = [f for f in reader]  # not list(): the reader reports an infinite len
    assert len(frames) == 6 and frames[0].shape == (32, 48, 3)
    # uint8, channels-first, odd size (padded to even), overwrite in place, no temp files left
    odd = (torch.rand(4, 3, 17, 21) * 255).to(torch.uint8)
    save_video_mp4(path, odd, fps=4)
    with iio2.get_reader(str(path), format="FFMPEG") as reader:
        frames = [f for f in reader]  # not list(): the reader reports an infinite len
    assert len(frames) == 4 and frames[0].shape == (18, 22, 3)
    assert os.listdir(path.parent) == ["video.mp4"]


def test_save_video_mp4_opencv_fallback(tmp_path, monkeypatch):
    """Without an ffmpeg binary the mp4 comes from OpenCV (the GPU machine has cv2 and no
    imageio-ffmpeg); the frames read back close to what went in."""
    cv2 = pytest.importorskip("cv2", reason="OpenCV is not installed here (the fallback's only user)")
    import fourdgen.media as media

    monkeypatch.setattr(media, "_has_ffmpeg", lambda: False)
    video = torch.linspace(0, 1, 5).view(5, 1, 1, 1).expand(5, 24, 32, 3).contiguous()
    path = tmp_path / "v.mp4"
    save_video_mp4(path, video, fps=5)
    cap = cv2.VideoCapture(str(path))
    frames = []
    while (ok := cap.read())[0]:
        frames.append(ok[1])
    cap.release()
    assert len(frames) == 5 and frames[0].shape == (24, 32, 3)
    means = [f.mean() / 255 for f in frames]
    assert max(abs(m - t) for m, t in zip(means, torch.linspace(0, 1, 5).tolist(), strict=True)) < 0.05
    assert os.listdir(tmp_path) == ["v.mp4"]


def test_save_video_mp4_without_any_encoder(tmp_path, monkeypatch):
    import fourdgen.media as media

    monkeypatch.setattr(media, "_has_ffmpeg", lambda: False)
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    with pytest.raises(RuntimeError, match="no ffmpeg binary.*imageio-ffmpeg.*no OpenCV"):
        save_video_mp4(tmp_path / "v.mp4", torch.rand(2, 8, 8, 3))
    assert os.listdir(tmp_path) == []
