"""Transformer pieces of VGGT-style models: 2-D rotary embeddings and a pre-norm block whose
attention takes token positions. Parameter names follow the official VGGT layout so checkpoints
load without renaming. timm's ``Block`` has no hook for per-token rotary positions, hence this one
(its ``Mlp`` and ``LayerScale`` are reused)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import LayerScale, Mlp
from torch import Tensor, nn


def grid_positions(height: int, width: int, device=None) -> Tensor:
    """``[height * width, 2]`` (row, col) of each patch, row-major (the token order of a ViT)."""
    return torch.cartesian_prod(torch.arange(height, device=device), torch.arange(width, device=device))


class RotaryPositionEmbedding2D(nn.Module):
    """2-D RoPE (VGGT / CroCo): the first half of each head's channels rotates with the row, the
    second half with the column; each half uses the rotate-half form with ``frequency`` as base.

    ``forward(x [B, heads, N, D], pos [B, N, 2] (row, col) long) -> [B, heads, N, D]``.
    """

    def __init__(self, frequency: float = 100.0):
        super().__init__()
        self.frequency = frequency

    def _rope_1d(self, x: Tensor, pos: Tensor) -> Tensor:
        d = x.shape[-1]
        inv_freq = 1.0 / self.frequency ** (torch.arange(0, d, 2, device=x.device).float() / d)
        angles = pos.float()[..., None] * inv_freq  # [B, N, d/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, N, d]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        rows, cols = x.chunk(2, dim=-1)
        return torch.cat([self._rope_1d(rows, pos[..., 0]), self._rope_1d(cols, pos[..., 1])], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with optional per-head LayerNorm on q, k and 2-D RoPE.
    ``forward(x [B, N, C], pos [B, N, 2] | None) -> [B, N, C]``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        rope: RotaryPositionEmbedding2D | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block ``x + ls1(attn(norm1(x))) ; x + ls2(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        qk_norm: bool = False,
        rope: RotaryPositionEmbedding2D | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, qk_norm, rope)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def zero_init_output(self) -> None:
        """Make the block an identity map (both residual branches output 0) while keeping
        gradients flowing into every weight: zero the output projections, not the scales."""
        for lin in (self.attn.proj, self.mlp.fc2):
            nn.init.zeros_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
