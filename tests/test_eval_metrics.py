"""The papers' protocol metrics against hand-computed answers and plain numpy references:
video depth (pooled alignment, caps, pixel-weighted averages), DyCheck's masked PSNR/SSIM/LPIPS,
FVD's Fréchet distance on a tiny TorchScript network, CLIP-F / CLIP-V on a tiny CLIP."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from fourdgen.metrics.clip_video import CLIPEmbedder, clip_f, clip_v
from fourdgen.metrics.fvd import VideoFeatures, frechet_distance, fvd, gaussian_stats
from fourdgen.metrics.image import psnr
from fourdgen.metrics.masked import MaskedLPIPS, masked_psnr, masked_ssim
from fourdgen.metrics.video_depth import average_sequences, fit_scale_shift_l1, video_depth_metrics


def test_video_depth_hand_computed():
    gt = torch.tensor([1.0, 2.0, 4.0, 80.0]).reshape(1, 2, 2)
    pred = torch.ones(1, 2, 2)
    r = video_depth_metrics(pred, gt, align="none", max_depth=70)  # 80 is over the cap
    assert r["valid_pixels"] == 3
    assert r["abs_rel"] == pytest.approx((0 + 0.5 + 0.75) / 3)
    assert r["delta1"] == pytest.approx(1 / 3)  # ratios 1, 2, 4
    clipped = video_depth_metrics(torch.tensor([[[100.0]]]), torch.tensor([[[60.0]]]), align="none")
    assert clipped["abs_rel"] == pytest.approx(10 / 60)  # the prediction is clipped at the cap (70)


def test_video_depth_one_alignment_per_sequence():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 8, 9, generator=g) * 40 + 1
    assert video_depth_metrics(gt / 3, gt, "scale")["abs_rel"] == pytest.approx(0, abs=1e-6)
    for align in ("scale_shift", "scale_shift_l1"):
        r = video_depth_metrics((gt - 5) / 2, gt, align)
        assert r["abs_rel"] == pytest.approx(0, abs=1e-6) and r["delta1"] == 1.0
    # A different scale per frame is not undone: the protocol fits one scale to the whole video.
    per_frame = gt * torch.tensor([1.0, 2.0, 4.0])[:, None, None]
    assert video_depth_metrics(per_frame, gt, "scale")["abs_rel"] > 0.2


def test_l1_alignment_ignores_outliers_least_squares_does_not():
    g = torch.Generator().manual_seed(1)
    gt = torch.rand(400, generator=g) * 10 + 1
    pred = (gt - 1) / 2
    pred[:40] = pred[:40].flip(0)  # 10% wrong depths (in range: LAD is robust to residuals, not leverage)
    s, t = fit_scale_shift_l1(pred, gt)
    assert s == pytest.approx(2.0, abs=1e-4) and t == pytest.approx(1.0, abs=1e-3)
    A = np.stack([pred.numpy(), np.ones(400)], 1)
    s_ls = np.linalg.lstsq(A, gt.numpy(), rcond=None)[0][0]
    assert abs(s_ls - 2) > 0.1


def test_sequences_are_weighted_by_valid_pixels():
    a = {"abs_rel": 0.1, "delta1": 0.9, "valid_pixels": 300}
    b = {"abs_rel": 0.5, "delta1": 0.5, "valid_pixels": 100}
    r = average_sequences([a, b, {"abs_rel": math.nan, "delta1": math.nan, "valid_pixels": 0}])
    assert (
        r["abs_rel"] == pytest.approx(0.2) and r["delta1"] == pytest.approx(0.8) and r["valid_pixels"] == 400
    )


def _np_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """tf.image.ssim's formula, written out (valid borders, 11-tap Gaussian, sigma 1.5)."""
    f = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
    w = np.outer(f, f) / f.sum() ** 2
    vals = []
    for a, b in zip(x, y, strict=True):
        mu_a, mu_b = convolve2d(a, w, "valid"), convolve2d(b, w, "valid")
        saa = convolve2d(a * a, w, "valid") - mu_a**2
        sbb = convolve2d(b * b, w, "valid") - mu_b**2
        sab = convolve2d(a * b, w, "valid") - mu_a * mu_b
        c1, c2 = 0.01**2, 0.03**2
        vals.append((2 * mu_a * mu_b + c1) * (2 * sab + c2) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2)))
    return float(np.mean(vals))


def test_masked_psnr_and_ssim():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 16, 20, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(3, 16, 20, generator=g, dtype=torch.float64)).clamp(0, 1)
    mask = torch.zeros(16, 20, dtype=torch.bool)
    mask[:, :12] = True
    mse = ((x - y) ** 2).numpy()[:, :, :12].mean()
    assert float(masked_psnr(x, y, mask)) == pytest.approx(-10 * np.log10(mse))
    assert float(masked_psnr(x, y)) == pytest.approx(float(psnr(x.float(), y.float())), abs=1e-4)
    assert float(masked_ssim(x, y)) == pytest.approx(_np_ssim(x.numpy(), y.numpy()), abs=1e-10)
    assert float(masked_ssim(x, x, mask)) == pytest.approx(1.0)
    y2 = y.clone()
    y2[:, :, 12:] = 0.0  # pixels outside the mask do not count
    assert float(masked_ssim(x, y2, mask)) == pytest.approx(float(masked_ssim(x, y, mask)), abs=1e-12)
    assert float(masked_psnr(x, y2, mask)) == pytest.approx(float(masked_psnr(x, y, mask)))


def test_masked_lpips():
    with warnings.catch_warnings():  # warned once per process: maybe by an earlier test
        warnings.simplefilter("ignore", UserWarning)
        metric = MaskedLPIPS(allow_random_backbone=True)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g)
    mask = torch.zeros(32, 32)
    mask[8:, :] = 1
    assert float(metric(x, x, mask)) == pytest.approx(0.0, abs=1e-7)
    y2 = y.clone()
    y2[:, :8] = 0.5
    assert float(metric(x, y2, mask)) == pytest.approx(float(metric(x, y, mask)), abs=1e-6)
    assert float(metric(x, y, mask)) > 0


def test_frechet_distance_known_answer():
    mu1, mu2 = np.array([0.0, 1.0]), np.array([3.0, 1.0])
    s1, s2 = np.diag([4.0, 1.0]), np.diag([1.0, 9.0])
    # diagonal: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2 = 9 + (2 - 1)^2 + (1 - 3)^2
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(14.0)
    f = np.random.default_rng(0).normal(size=(50, 4))
    assert frechet_distance(*gaussian_stats(f), *gaussian_stats(f)) == pytest.approx(0.0, abs=1e-8)
    mu, sigma = gaussian_stats(f)
    np.testing.assert_allclose(sigma, np.cov(f.T))  # unbiased, as StyleGAN-V


class _TinyI3D(torch.nn.Module):
    """StyleGAN-V's I3D call signature on a random linear map of pooled frames."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4, 6)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = True, return_features: bool = True
    ):
        pooled = torch.nn.functional.adaptive_avg_pool3d(x, (4, 1, 1)).flatten(1)  # [B, 3 * 4]
        return self.proj(pooled)


def test_fvd_on_a_tiny_torchscript_network(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "i3d_tiny.pt"
    torch.jit.script(_TinyI3D()).save(str(path))
    feats = VideoFeatures(path)
    g = torch.Generator().manual_seed(4)
    real = torch.rand(12, 4, 3, 8, 8, generator=g)
    fake = (real * 0.5 + 0.3).clamp(0, 1)
    assert fvd(real, real, feats) == pytest.approx(0.0, abs=1e-6)
    net = torch.jit.load(str(path))
    with torch.no_grad():
        fr, ff = (net(v.permute(0, 2, 1, 3, 4) * 2 - 1).numpy() for v in (real, fake))
    want = frechet_distance(*gaussian_stats(fr), *gaussian_stats(ff))
    assert fvd(real, fake, feats, batch_size=5) == pytest.approx(want, rel=1e-5) and want > 0


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("clip")
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root
    )
    return root


def test_clip_f_and_clip_v(tiny_clip):
    embed = CLIPEmbedder(tiny_clip)
    g = torch.Generator().manual_seed(5)
    video = torch.rand(4, 3, 40, 48, generator=g)
    still = video[:1].expand(4, -1, -1, -1)
    assert clip_f(still, embed) == pytest.approx(1.0, abs=1e-5)
    assert clip_v(video, video, embed) == pytest.approx(1.0, abs=1e-5)
    e = embed(video)
    want = np.mean([float(e[t] @ e[t + 1]) for t in range(3)])
    assert clip_f(video, embed) == pytest.approx(want, abs=1e-6) and want < 1.0
