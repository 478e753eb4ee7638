"""Multi-view grid DiT installation: fused view-time self-attention, collapsed RoPE positions,
reference patch embeddings (4Real-Video-V2) and per-block camera encoders (Full-4D).

Everything keeps the stock diffusers state-dict keys; new layers live beside ``attn1`` in each
block (``fused_attn``, ``fused_proj``, ``camera_encoder``) so FSDP2 shards them with their block.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from torch import Tensor, nn

from fourdgen.nn.fused_attention import (
    BranchedViewTimeProcessor,
    FusedViewTimeProcessor,
    GridAttentionState,
    zero_linear,
)
from fourdgen.nn.rope import GridRotaryPosEmbed

CAMERA_DIM = 12  # a flattened relative [R|t]


class LayoutRotaryPosEmbed(GridRotaryPosEmbed):
    """Wan's RoPE with positions from the current :class:`GridLayout` (frame ``v * t_max + f``);
    outside grid calls (no layout set) it is Wan's default."""

    def __init__(self, rope: GridRotaryPosEmbed, state: GridAttentionState):
        super().__init__(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
        self.to(rope.freqs_cos.device)
        self.state = state

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        layout = self.state.layout
        if layout is None:
            return super().forward(hidden_states)
        _, _, Fr, H, W = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        n = (Fr // p_t) * (H // p_h) * (W // p_w)
        if n != layout.num_tokens:
            raise ValueError(
                f"DiT input {tuple(hidden_states.shape)} gives {n} tokens, {layout} has {layout.num_tokens}"
            )
        last = (layout.views - 1) * layout.stride + layout.frames
        if last > self.max_seq_len:
            raise ValueError(
                f"GridLayout: frame positions reach {last} (views x t_max), beyond the DiT's "
                f"rope_max_seq_len={self.max_seq_len}; lower t_max or the number of views"
            )
        return self.gather(layout.position_ids(self.freqs_cos.device))


class ReferencePatchEmbed(nn.Conv3d):
    """Wan's patch embedding (same keys) plus the patch embeddings of reference frames added to the
    noised tokens at their positions (4Real-Video-V2 "grounded generation"): ``conv(x) +
    conv_nobias(reference)``. The reference tensor is zero outside reference frames; the bias is
    left out so only the reference content is added (the paper does not say; a zero reference then
    adds nothing)."""

    def __init__(self, conv: nn.Conv3d, state: GridAttentionState):
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
        self.state = state

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        ref = self.state.reference
        if ref is not None:
            if ref.shape != x.shape:
                raise ValueError(
                    f"reference latents {tuple(ref.shape)} do not match the DiT input {tuple(x.shape)}"
                )
            y = y + F.conv3d(ref.to(x.dtype), self.weight, None, self.stride, self.padding)
        return y


def install_grid(
    transformer: WanTransformer3DModel,
    state: GridAttentionState,
    branch: bool = False,
    reference: bool = False,
) -> WanTransformer3DModel:
    """Make ``transformer`` a multi-view grid model (in place; returns it).

    ``branch=False`` (4Real-Video-V2): every self-attention uses the fused mask with its own weights.
    ``branch=True`` (Full-4D): self-attention stays per view; a copy of it runs the fused mask and is
    added through a zero-initialised ``fused_proj``, and a zero-initialised ``camera_encoder`` adds
    each view's camera. ``reference``: reference-frame patch embeddings (4Real-Video-V2).
    """
    transformer.rope = LayoutRotaryPosEmbed(transformer.rope, state)
    if reference and not isinstance(transformer.patch_embedding, ReferencePatchEmbed):
        transformer.patch_embedding = ReferencePatchEmbed(transformer.patch_embedding, state)
    for block in transformer.blocks:
        if not branch:
            block.attn1.set_processor(FusedViewTimeProcessor(state))
            continue
        dim = block.attn1.to_out[0].out_features
        block.fused_attn = copy.deepcopy(block.attn1)
        block.fused_attn.set_processor(FusedViewTimeProcessor(state))
        block.fused_proj = zero_linear(dim, dim, block.attn1)
        block.camera_encoder = zero_linear(CAMERA_DIM, dim, block.attn1)
        block.attn1.set_processor(
            BranchedViewTimeProcessor(state, block.fused_attn, block.fused_proj, block.camera_encoder)
        )
    return transformer


def relative_cameras(w2c: Tensor, source_view: int = 0, normalize: bool = True) -> Tensor:
    """Per-view ``[R|t]`` relative to the source view, ``w2c [B, V, 4, 4]`` -> ``[B, V, 12]``.

    ``rel_v = w2c_v @ inv(w2c_src)`` maps source-camera coordinates to view v's. With ``normalize``
    translations are divided by the largest one of the grid (scale-free: depth from a monocular
    estimator has an arbitrary scale; Full-4D does not say how it scales)."""
    rel = w2c @ torch.linalg.inv(w2c[:, source_view : source_view + 1])
    Rt = rel[..., :3, :4].clone()
    if normalize:
        s = Rt[..., 3].norm(dim=-1).amax(dim=1).clamp_min(1e-8)  # [B]
        Rt[..., 3] = Rt[..., 3] / s[:, None, None]
    return Rt.flatten(-2)
