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

from fourdgen.diffusion.latents import encode_video, scale_factors
from fourdgen.geometry.pointmaps import xyz_condition_grid


class GuidedFirstFrame:
    """4DNeX guided first-frame conditioning (as Wan2.1 I2V, with a width-fused XYZ half).

    Channels: ``[mask (temporal VAE factor), condition latents (z_dim)]``, e.g. 4 + 16 = 20 for the
    Wan2.1 VAE, which with 16 noisy channels makes the I2V checkpoint's 36 input channels.

    Args:
        rgb_mask / xyz_mask: guided-mask values of the first frame's RGB and XYZ halves.
        xyz_guess: ``"grid"`` (4DNeX's slanted-plane grid) or ``"zeros"`` for the XYZ half of the
            condition frame.
    """

    def __init__(self, rgb_mask: float = 1.0, xyz_mask: float = 0.5, xyz_guess: str = "grid"):
        if xyz_guess not in ("grid", "zeros"):
            raise ValueError(f"GuidedFirstFrame: xyz_guess must be 'grid' or 'zeros', got {xyz_guess!r}")
        self.rgb_mask, self.xyz_mask, self.xyz_guess = rgb_mask, xyz_mask, xyz_guess

    @property
    def config(self) -> dict:
        return {"rgb_mask": self.rgb_mask, "xyz_mask": self.xyz_mask, "xyz_guess": self.xyz_guess}

    @property
    def cache_key(self) -> str:
        return f"guided_first_frame:{self.xyz_guess}"

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

    def encode(self, vae: AutoencoderKLWan, rgb: Tensor) -> Tensor:
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

    def __call__(self, cond_latents: Tensor, vae: AutoencoderKLWan) -> Tensor:
        """Extra input channels ``[B, t_factor + z_dim, F, h, 2w]``."""
        return torch.cat([self.mask(cond_latents, scale_factors(vae)[0]), cond_latents], dim=1)
