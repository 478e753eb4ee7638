"""Fréchet Video Distance (Unterthiner et al. 2018) on I3D features from a local file.

``FVD = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` between Gaussians fitted to the
features of real and generated videos (mean and unbiased covariance, as StyleGAN-V's
``compute_fvd``). :class:`VideoFeatures` runs a feature network loaded from a local path: by default
StyleGAN-V's TorchScript I3D (``i3d_torchscript.pt``), called as it calls it,
``net(videos [B, 3, T, H, W] in [-1, 1], rescale=False, resize=True, return_features=True)``.
Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn

from fourdgen.errors import ConfigError


def gaussian_stats(features: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])`` of ``features [N, D]`` (N >= 2), float64."""
    f = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"expected features [N >= 2, D], got {list(f.shape)}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        off = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + off) @ (sigma2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class VideoFeatures:
    """Features ``[B, D]`` of videos ``[B, T, 3, H, W]`` in [0, 1] from a local network.

    Args:
        net: a path to a TorchScript file (``torch.jit.load``) or a module.
        call_kwargs: keyword arguments of each call (default: StyleGAN-V's I3D call).
        device: where the network runs.
    """

    def __init__(
        self,
        net: str | Path | nn.Module | Callable,
        call_kwargs: dict | None = None,
        device: str = "cpu",
    ):
        if isinstance(net, (str, Path)):
            if not Path(net).is_file():
                raise ConfigError(
                    f"FVD feature network: expected a local TorchScript file, got {net} (missing)"
                )
            net = torch.jit.load(str(net), map_location=device)
        self.net = net.eval() if isinstance(net, nn.Module) else net
        self.kwargs = (
            dict(rescale=False, resize=True, return_features=True) if call_kwargs is None else call_kwargs
        )
        self.device = device

    @torch.no_grad()
    def __call__(self, videos: Tensor) -> Tensor:
        x = videos.to(self.device, torch.float32).permute(0, 2, 1, 3, 4) * 2 - 1  # [B, 3, T, H, W]
        return self.net(x, **self.kwargs).float().reshape(x.shape[0], -1).cpu()


def fvd(real: Tensor, fake: Tensor, features: VideoFeatures, batch_size: int = 16) -> float:
    """FVD between two sets of videos ``[N, T, 3, H, W]`` in [0, 1] (each N >= 2)."""

    def feats(v: Tensor) -> Tensor:
        return torch.cat([features(v[i : i + batch_size]) for i in range(0, v.shape[0], batch_size)])

    return frechet_distance(*gaussian_stats(feats(real)), *gaussian_stats(feats(fake)))
