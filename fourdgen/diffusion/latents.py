"""Video <-> Wan VAE latents, and the pointmap preparation RGB+XYZ diffusion trains on.

One code path for both the latent cache (:mod:`fourdgen.data.pointmaps`) and on-the-fly encoding
in the stage module, so cached and uncached training see identical tensors.
Latents follow diffusers' Wan convention: ``(z - latents_mean) / latents_std``.
"""

from __future__ import annotations

import hashlib
import json

import torch
from diffusers import AutoencoderKLWan
from torch import Tensor

from fourdgen.geometry.pointmaps import PointmapNorm, PointmapNormalization, renormalize_latents


def vae_id(vae: AutoencoderKLWan) -> str:
    """Fingerprint of a VAE (config + weights): latents cached with one VAE are not reused with another."""
    h = hashlib.sha1(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in vae.state_dict().items():
            # The exact bytes (on CPU, in float32): sums of the weights depend on the device's and
            # thread count's reduction order, so the same VAE on GPU and CPU could disagree.
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def scale_factors(vae: AutoencoderKLWan) -> tuple[int, int]:
    """(temporal, spatial) down-sampling of the VAE, from its architecture (the config's
    ``scale_factor_*`` keep Wan2.1's values even for other shapes)."""
    down = list(vae.config.temperal_downsample)
    return 2 ** sum(down), 2 ** len(down) * (vae.config.patch_size or 1)


def _stats(vae: AutoencoderKLWan, z: Tensor) -> tuple[Tensor, Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(shape)
    return mean, std


def encode_video(vae: AutoencoderKLWan, video: Tensor, grad: bool = False) -> Tensor:
    """``video [B, 3, T, H, W]`` in [-1, 1] -> normalised latents ``[B, C, F, h, w]``.

    Uses the posterior mode (deterministic, so a cache equals a fresh encoding). Runs on the VAE's
    device; the latents stay there. ``grad=True`` keeps the graph back to ``video`` (the frozen
    encoder stays differentiable: flow-matching distillation backpropagates through it into the
    renderer); otherwise no graph is built."""
    p = next(vae.parameters())
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        z = vae.encode(video.to(p.device, p.dtype)).latent_dist.mode()
        mean, std = _stats(vae, z)
        return ((z - mean) / std).float()


@torch.no_grad()
def decode_video(vae: AutoencoderKLWan, latents: Tensor) -> Tensor:
    """Inverse of :func:`encode_video`: ``[B, C, F, h, w]`` -> ``[B, 3, T, H, W]`` in [-1, 1]."""
    dtype = next(vae.parameters()).dtype
    mean, std = _stats(vae, latents.to(dtype))
    return vae.decode(latents.to(dtype) * std + mean).sample.float().clamp(-1, 1)


def prepare_pointmaps(
    xyz_world: Tensor,
    w2c_first: Tensor,
    valid: Tensor | None = None,
    norm: PointmapNormalization | None = None,
) -> tuple[Tensor, PointmapNorm]:
    """Pointmap preparation of one clip: ``xyz_world [T, H, W, 3]`` -> first-camera frame -> ``norm``
    (default 4DNeX's per-frame clip and centring, one scale). Returns ``[T, H, W, 3]`` in [-1, 1]
    and the normalisation."""
    return (norm or PointmapNormalization())(xyz_world, w2c_first, valid)


@torch.no_grad()
def encode_pointmaps(vae: AutoencoderKLWan, xyz_norm: Tensor, shift: float, scale: float) -> Tensor:
    """Normalised pointmaps ``[B, T, H, W, 3]`` -> renormalised latents ``(z + shift) / scale``."""
    return renormalize_latents(encode_video(vae, xyz_norm.permute(0, 4, 1, 2, 3)), shift, scale)
