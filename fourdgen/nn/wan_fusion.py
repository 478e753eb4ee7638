"""4DNeX width-wise RGB+XYZ fusion on diffusers' Wan DiT.

RGB and XYZ latents ``[B, C, F, h, w]`` are concatenated along width. After patch embedding a
learnable domain embedding (zeros(2, dim)) is added to each half, and the XYZ half reuses the RGB
half's 3-D RoPE positions, so a pixel and its XYZ twin share positions. Both changes keep the
stock state-dict keys (only ``patch_embedding.domain_embedding`` is new), so pretrained weights
load unchanged and diffusers LoRA files still apply.
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from torch import Tensor, nn

from fourdgen.nn.coupling import LatentCoupling, call_dit
from fourdgen.nn.rope import GridRotaryPosEmbed


class DomainPatchEmbed(nn.Conv3d):
    """Wan's patch-embedding convolution (same ``weight``/``bias`` keys) plus a per-domain
    embedding added to each of ``num_domains`` equal width slices of its output."""

    def __init__(self, conv: nn.Conv3d, num_domains: int = 2):
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        self.load_state_dict(conv.state_dict())
        self.num_domains = num_domains
        self.domain_embedding = nn.Parameter(
            torch.zeros(num_domains, conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
        )

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)  # [B, dim, f, h, w]
        w = y.shape[-1]
        if w % self.num_domains:
            raise ValueError(
                f"DomainPatchEmbed: width {w} (patches) not divisible by {self.num_domains} domains"
            )
        dom = torch.arange(self.num_domains, device=y.device).repeat_interleave(w // self.num_domains)
        return y + self.domain_embedding[dom].T[None, :, None, None].to(y.dtype)


def install_width_fusion(transformer: WanTransformer3DModel, num_domains: int = 2) -> WanTransformer3DModel:
    """Make ``transformer`` take width-concatenated domains (in place; returns it)."""
    if not isinstance(transformer.patch_embedding, DomainPatchEmbed):
        transformer.patch_embedding = DomainPatchEmbed(transformer.patch_embedding, num_domains)
    transformer.rope = GridRotaryPosEmbed.from_rope(transformer.rope, width_tiles=num_domains)
    return transformer


def fuse_width(*latents: Tensor) -> Tensor:
    """``[B, C, F, h, w]`` each -> ``[B, C, F, h, k * w]`` (RGB first, then XYZ)."""
    return torch.cat(latents, dim=-1)


def split_width(latents: Tensor, num_domains: int = 2) -> tuple[Tensor, ...]:
    """Inverse of :func:`fuse_width`."""
    return latents.chunk(num_domains, dim=-1)


class WidthFusion(LatentCoupling):
    """4DNeX's coupling of the RGB and XYZ branches: one token sequence, XYZ latents to the right
    of the RGB latents (shared RoPE positions, a domain embedding per half). A recipe picks the
    coupling by ``class_path``; other couplings (decoupled LoRA, multi-view grids) offer the same
    methods."""

    num_domains = 2
    trainable = ("domain_embedding",)  # new parameters that train next to the LoRA

    def install(self, transformer: WanTransformer3DModel) -> WanTransformer3DModel:
        return install_width_fusion(transformer, self.num_domains)

    def fuse(self, rgb: Tensor, xyz: Tensor) -> Tensor:
        """``[B, C, F, h, w]`` twice -> ``[B, C, F, h, 2w]``."""
        return fuse_width(rgb, xyz)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return split_width(x, self.num_domains)

    def predict(
        self,
        transformer: WanTransformer3DModel,
        x: Tensor,
        cond: Tensor,
        timestep: Tensor,
        text: Tensor,
        image,
    ) -> Tensor:
        """DiT velocity ``[B, C, F, h, 2w]`` for noisy fused latents ``x`` and conditioning channels."""
        return call_dit(transformer, torch.cat([x, cond], dim=1), timestep, text, image)
