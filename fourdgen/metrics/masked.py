"""DyCheck's masked image metrics (mPSNR, mSSIM, mLPIPS): scores over co-visible pixels only.

Ported from DyCheck's ``dycheck/core/metrics/image.py`` (Gao et al., "Monocular Dynamic View
Synthesis: A Reality Check", 2022):

- mPSNR: ``-10 log10`` of the squared error averaged over masked pixels and channels.
- mSSIM: tf.image.ssim-style SSIM (Gaussian window 11, sigma 1.5, "valid" borders) whose blurs
  are partial convolutions (Liu et al. 2018): each window averages its masked pixels only and
  windows without one give 0 means and variances. The SSIM map is averaged over all windows.
- mLPIPS: spatial LPIPS of the masked images (pixels outside the mask set to 0), averaged over
  the mask.

Images are ``[3, H, W]`` in [0, 1]; masks ``[H, W]`` (bool or {0, 1}).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fourdgen.metrics.image import build_lpips_net


def masked_psnr(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """mPSNR in dB of ``[3, H, W]`` images over ``mask [H, W]`` (all pixels if None)."""
    err = (pred.double() - target.double()) ** 2
    m = torch.ones_like(err) if mask is None else mask.double().expand_as(err)
    return -10.0 * torch.log10((err * m).sum() / m.sum().clamp_min(1e-10))


def _gaussian(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    f = torch.exp(-0.5 * (x / sigma) ** 2)
    return f / f.sum()


def _partial_blur(z: Tensor, m: Tensor, f: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Valid-mode 1-D blur of ``z [C, H, W]`` along ``dim`` (1: rows, 2: columns) over mask ``m``."""
    k = f.numel()
    shape = (1, 1, k, 1) if dim == 1 else (1, 1, 1, k)
    weight = f.reshape(shape).to(z)
    zc = F.conv2d((z * m)[:, None], weight)[:, 0]
    mc = F.conv2d(m[None, None], torch.ones_like(weight))[0, 0]
    return torch.where(mc != 0, zc * k / mc.where(mc != 0, 1.0), 0.0), (mc != 0).to(z)


def masked_ssim(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    max_val: float = 1.0,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """mSSIM of ``[3, H, W]`` images over ``mask [H, W]`` (H, W >= 11), float64 scalar."""
    x, y = pred.double(), target.double()
    m = torch.ones_like(x[0]) if mask is None else mask.double()
    f = _gaussian()

    def blur(z: Tensor) -> Tensor:
        return _partial_blur(*_partial_blur(z, m, f, dim=2), f, dim=1)[0]

    mu0, mu1 = blur(x), blur(y)
    s00 = (blur(x * x) - mu0 * mu0).clamp_min(0)
    s11 = (blur(y * y) - mu1 * mu1).clamp_min(0)
    s01 = blur(x * y) - mu0 * mu1
    s01 = torch.sign(s01) * torch.minimum((s00 * s11).sqrt(), s01.abs())
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    num = (2 * mu0 * mu1 + c1) * (2 * s01 + c2)
    den = (mu0**2 + mu1**2 + c1) * (s00 + s11 + c2)
    return (num / den).mean()


class MaskedLPIPS:
    """mLPIPS: spatial LPIPS of the masked images, averaged over the mask.

    ``net``/``backbone_weights``/``allow_random_backbone`` as :class:`fourdgen.metrics.image.LPIPS`
    (local weights; nothing is downloaded).
    """

    def __init__(
        self, net: str = "alex", backbone_weights: str | None = None, allow_random_backbone: bool = False
    ):
        self.net = build_lpips_net(net, backbone_weights, allow_random_backbone)
        self.net.spatial = True  # per-pixel map, each layer upsampled to the input size

    @torch.no_grad()
    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        m = torch.ones_like(pred[:1]) if mask is None else mask.to(pred.dtype)[None]
        x, y = (pred.float() * m) * 2 - 1, (target.float() * m) * 2 - 1
        d = self.net(x[None], y[None])[0].double()  # [1, H, W]
        return (d * m).sum() / m.sum().clamp_min(1e-10)
