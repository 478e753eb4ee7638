"""Wan's 3-D RoPE gathered by explicit position ids: shared by 4DNeX's width fusion and the grid
layouts of the multi-view models."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from torch import Tensor


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
