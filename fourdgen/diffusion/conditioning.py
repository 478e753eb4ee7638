"""Conditioning components of the video diffusion stage: what is concatenated to the noisy latents
along channels. A recipe picks one by ``class_path``.

:class:`GuidedFirstFrame` is 4DNeX's: Wan I2V conditioning (mask channels + VAE latents of a
condition video) where the condition video's first frame is the input image next to a synthetic
XYZ guess, and the mask is 1 on the RGB half and 0.5 on the XYZ half of the first frame.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from torch import Tensor

from fourdgen.components import Recorded
from fourdgen.diffusion.latents import encode_video, scale_factors
from fourdgen.geometry.pointmaps import xyz_condition_grid


class Conditioning(Recorded):
    """Base class of the conditioning components: extra DiT input channels built from the clip's
    observed frames. ``cache_key`` (None: not cacheable) names what a latent cache may store."""

    cache_key: str | None = None

    def channels(self, vae: AutoencoderKLWan) -> int:
        raise NotImplementedError

    def observed(self, b, training: bool = False) -> Tensor:
        """Observed frames ``[B, T]`` bool of batch ``b`` (drawn at random in training if the
        component trains several tasks)."""
        raise NotImplementedError

    def encode(self, vae: AutoencoderKLWan, rgb: Tensor, observed: Tensor | None = None) -> Tensor:
        """VAE latents of the condition video of ``rgb [B, 3, T, H, W]``."""
        raise NotImplementedError

    def __call__(self, cond_latents: Tensor, vae: AutoencoderKLWan, observed: Tensor | None = None) -> Tensor:
        """Extra channels ``[B, C_cond, F, h, w']`` from the condition latents."""
        raise NotImplementedError


class GuidedFirstFrame(Conditioning):
    """4DNeX guided first-frame conditioning (as Wan2.1 I2V, with a width-fused XYZ half).

    Channels: ``[mask (temporal VAE factor), condition latents (z_dim)]``, e.g. 4 + 16 = 20 for the
    Wan2.1 VAE, which with 16 noisy channels makes the I2V checkpoint's 36 input channels.

    Args:
        rgb_mask / xyz_mask: guided-mask values of the first frame's RGB and XYZ halves.
        xyz_guess: ``"grid"`` (4DNeX's official uniform pointmap, :func:`xyz_condition_grid`) or
            ``"zeros"`` for the XYZ half of the condition frame.
    """

    def __init__(self, rgb_mask: float = 1.0, xyz_mask: float = 0.5, xyz_guess: str = "grid"):
        if xyz_guess not in ("grid", "zeros"):
            raise ValueError(f"GuidedFirstFrame: xyz_guess must be 'grid' or 'zeros', got {xyz_guess!r}")
        self.rgb_mask, self.xyz_mask, self.xyz_guess = rgb_mask, xyz_mask, xyz_guess

    @property
    def cache_key(self) -> str:
        # v2: the grid became the official one (z in [-1, 1]); caches of the old grid are stale.
        return f"guided_first_frame:{self.xyz_guess}:v2"

    def channels(self, vae: AutoencoderKLWan) -> int:
        return scale_factors(vae)[0] + vae.config.z_dim

    def condition_video(self, rgb: Tensor) -> Tensor:
        """``rgb [B, 3, T, H, W]`` in [-1, 1] -> ``[B, 3, T, H, 2W]``: first frame = image | XYZ guess
        (width-wise, in pixel space), later frames zero."""
        B, _, T, H, W = rgb.shape
        guess = xyz_condition_grid(H, W).permute(2, 0, 1).to(rgb)
        if self.xyz_guess == "zeros":
            guess = torch.zeros_like(guess)
        first = torch.cat([rgb[:, :, 0], guess.expand(B, -1, -1, -1)], dim=-1)
        video = rgb.new_zeros(B, 3, T, H, 2 * W)
        video[:, :, 0] = first
        return video

    def observed(self, b, training: bool = False) -> Tensor:
        """Given frames ``[B, T]``: always the first one (4DNeX is image-to-4D)."""
        B, _, T = b.observed.shape
        obs = torch.zeros(B, T, dtype=torch.bool, device=b.rgb.device)
        obs[:, 0] = True
        return obs

    def encode(self, vae: AutoencoderKLWan, rgb: Tensor, observed: Tensor | None = None) -> Tensor:
        """Latents of :meth:`condition_video` ``[B, z_dim, F, h, 2w]`` (cacheable)."""
        return encode_video(vae, self.condition_video(rgb))

    def mask(self, cond_latents: Tensor, t_factor: int) -> Tensor:
        """Mask channels ``[B, t_factor, F, h, 2w]``: Wan I2V packs the first pixel frame's mask
        ``t_factor`` times into the first latent frame; later frames are 0."""
        B, _, F, h, w2 = cond_latents.shape
        m = cond_latents.new_zeros(B, t_factor, F, h, w2)
        m[:, :, 0, :, : w2 // 2] = self.rgb_mask
        m[:, :, 0, :, w2 // 2 :] = self.xyz_mask
        return m

    def __call__(self, cond_latents: Tensor, vae: AutoencoderKLWan, observed: Tensor | None = None) -> Tensor:
        """Extra input channels ``[B, t_factor + z_dim, F, h, 2w]``."""
        return torch.cat([self.mask(cond_latents, scale_factors(vae)[0]), cond_latents], dim=1)


TASKS = ("image", "sparse", "video")


class MaskedFrames(Conditioning):
    """One4D's Unified Masked Conditioning (section 3.3): the observed frames, zeros elsewhere,
    VAE-encoded, next to a binary observed-frame mask at latent resolution, as extra channels of the
    RGB branch. Single image (first frame), sparse frames or the full video: one model.

    Channels ``[mask (temporal VAE factor), condition latents (z_dim)]``: 4 + 16 = 20 for the Wan2.1
    VAE, the 36-channel input of Wan2.1-Fun-InP (One4D's base). The mask is packed as Wan's
    inpainting models pack it: latent frame 0 holds pixel frame 0 repeated, latent frame k holds
    pixel frames ``4k-3 .. 4k``.

    Training samples a task per clip with ``ratios`` (One4D: 0.35 image, 0.30 sparse, 0.35 video).
    One4D does not say how sparse frames are drawn: here the first frame plus a uniform random
    number (1 .. T-2) of other frames, chosen uniformly. Validation and prediction use the batch's
    ``observed`` cells (with no cell observed, the first frame).
    """

    cache_key = None  # tasks are drawn per step: nothing to cache

    def __init__(self, ratios: tuple[float, float, float] = (0.35, 0.30, 0.35), seed: int | None = None):
        if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
            raise ValueError(
                f"MaskedFrames: ratios must be 3 non-negative weights (image, sparse, video), got {ratios}"
            )
        self.ratios = tuple(float(r) for r in ratios)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def channels(self, vae: AutoencoderKLWan) -> int:
        return scale_factors(vae)[0] + vae.config.z_dim

    def sample(self, B: int, T: int, task: str | None = None) -> Tensor:
        """Observed frames ``[B, T]`` bool for random (or the named) tasks."""
        obs = torch.zeros(B, T, dtype=torch.bool)
        w = torch.tensor(self.ratios)
        for i in range(B):
            name = task or TASKS[int(torch.multinomial(w, 1, generator=self.generator))]
            if name == "video" or T == 1:
                obs[i] = True
            elif name == "sparse" and T > 2:
                k = int(torch.randint(1, T - 1, (1,), generator=self.generator))
                obs[i, 1 + torch.randperm(T - 1, generator=self.generator)[:k]] = True
            obs[i, 0] = True
        return obs

    def observed(self, b, training: bool = False) -> Tensor:
        B, _, T = b.observed.shape
        if training:
            return self.sample(B, T).to(b.rgb.device)
        obs = b.observed[:, 0].clone()
        obs[~obs.any(dim=1), 0] = True
        return obs

    def condition_video(self, rgb: Tensor, observed: Tensor) -> Tensor:
        """``rgb [B, 3, T, H, W]``, ``observed [B, T]`` -> observed frames, zeros elsewhere."""
        return rgb * observed[:, None, :, None, None].to(rgb)

    def encode(self, vae: AutoencoderKLWan, rgb: Tensor, observed: Tensor) -> Tensor:
        return encode_video(vae, self.condition_video(rgb, observed))

    def mask(self, observed: Tensor, t_factor: int, latent_hw: tuple[int, int]) -> Tensor:
        """``observed [B, T]`` -> ``[B, t_factor, F, h, w]`` (Wan inpainting packing)."""
        B, T = observed.shape
        m = observed.float()
        m = torch.cat([m[:, :1].expand(B, t_factor), m[:, 1:]], dim=1)  # [B, T + t_factor - 1]
        m = m.view(B, -1, t_factor).transpose(1, 2)  # [B, t_factor, F]
        return m[..., None, None].expand(B, t_factor, m.shape[-1], *latent_hw)

    def __call__(self, cond_latents: Tensor, vae: AutoencoderKLWan, observed: Tensor) -> Tensor:
        """Extra input channels ``[B, t_factor + z_dim, F, h, w]``."""
        t_factor = scale_factors(vae)[0]
        m = self.mask(observed, t_factor, tuple(cond_latents.shape[-2:])).to(cond_latents)
        return torch.cat([m, cond_latents], dim=1)
