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
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from torch import Tensor, nn

from fourdgen.nn.coupling import Coupling, call_dit


class GridRotaryPosEmbed(WanRotaryPosEmbed):
    """Wan's RoPE gathered by explicit per-token (t, h, w) position ids.

    With ``width_tiles = k`` the input width holds k side-by-side copies of one layout, and every
    copy gets the first one's positions. ``width_tiles=1`` reproduces Wan's default exactly.
    """

    def __init__(
        self,
        attention_head_dim: int,
        patch_size: tuple[int, int, int],
        max_seq_len: int,
        width_tiles: int = 1,
    ):
        super().__init__(attention_head_dim, patch_size, max_seq_len)
        self.width_tiles = width_tiles

    @classmethod
    def from_rope(cls, rope: WanRotaryPosEmbed, width_tiles: int = 1) -> GridRotaryPosEmbed:
        new = cls(rope.attention_head_dim, rope.patch_size, rope.max_seq_len, width_tiles)
        return new.to(rope.freqs_cos.device)

    def position_ids(self, ppf: int, pph: int, ppw: int, device=None) -> Tensor:
        """``[ppf * pph * ppw, 3]`` (t, h, w) ids in Wan's token order (frame, row, column)."""
        if ppw % self.width_tiles:
            raise ValueError(
                f"GridRotaryPosEmbed: width {ppw} (patches) is not divisible by "
                f"width_tiles={self.width_tiles}"
            )
        t, h, w = torch.meshgrid(
            torch.arange(ppf, device=device),
            torch.arange(pph, device=device),
            torch.arange(ppw, device=device) % (ppw // self.width_tiles),
            indexing="ij",
        )
        return torch.stack([t, h, w], -1).reshape(-1, 3)

    def gather(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Frequencies ``(cos, sin)`` each ``[1, N, 1, head_dim]`` for ``ids [N, 3]``."""
        sizes = [self.t_dim, self.h_dim, self.w_dim]
        out = []
        for table in (self.freqs_cos, self.freqs_sin):
            parts = table.split(sizes, dim=1)
            out.append(torch.cat([parts[i][ids[:, i]] for i in range(3)], dim=-1)[None, :, None])
        return out[0], out[1]

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        _, _, F, H, W = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        return self.gather(self.position_ids(F // p_t, H // p_h, W // p_w, device=self.freqs_cos.device))


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


class WidthFusion(Coupling):
    """4DNeX's coupling of the RGB and XYZ branches: one token sequence, XYZ latents to the right
    of the RGB latents (shared RoPE positions, a domain embedding per half). A recipe picks the
    coupling by ``class_path``; other couplings (decoupled LoRA, multi-view grids) offer the same
    methods."""

    num_domains = 2
    owns_lora = False
    trainable = ("domain_embedding",)  # new parameters that train next to the LoRA

    @property
    def config(self) -> dict:
        return {}

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
