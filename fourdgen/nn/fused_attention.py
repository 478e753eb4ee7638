"""Fused view-time self-attention for Wan DiTs (4Real-Video-V2 section 3.1, Full-4D section 3.2).

Attention itself (:func:`grid_attention`) has exact implementations of one mask
(:class:`~fourdgen.nn.view_time_mask.ViewTimeMask`):

- ``dense``: SDPA with the ``N x N`` boolean mask. The reference; small layouts only.
- ``flex``: block-sparse FlexAttention (compiled) with the cached :class:`BlockMask`. The general
  GPU path (any mask, e.g. Full-4D's cross-half term).
- ``lse``: a mask of exactly ``same_view | same_time`` (4Real-Video-V2) as two disjoint dense
  attentions (per view; each frame against the other views' same frame) merged through their
  log-sum-exp, with its own backward
  (:mod:`fourdgen.nn.lse_attention`): dense kernels (cuDNN) instead of flex's block-sparse one.
- a mask of ``same_view`` alone is per-view dense attention (a batch of V ordinary videos), which
  SDPA runs at full speed with no mask at all: Full-4D's original per-video branch.

diffusers calls Wan self-attention as ``attn1(x, None, None, rotary_emb)``: no mask reaches it, so
the processors read the layout from a shared :class:`GridAttentionState` that the coupling sets
before each DiT call (the block mask is built once per layout and cached by the mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import _get_qkv_projections
from torch import Tensor, nn
from torch.nn.attention.flex_attention import flex_attention

from fourdgen.nn.attention_kernels import fused_kernel
from fourdgen.nn.grid_layout import GridLayout
from fourdgen.nn.lse_attention import view_time_attention
from fourdgen.nn.view_time_mask import ViewTimeMask

BACKENDS = ("auto", "flex", "dense", "lse")
# ``auto`` takes the LSE path on CUDA for view-OR-time masks: on the H200 (2026-12-03, run_all P1,
# 8 x 8 x 1560 tokens, 40 heads, bf16) it runs fwd+bwd in 359 ms against flex's 445 (ideal 309), and
# tests/gpu/test_lse_gpu.py passes there. ``False`` puts auto back on flex (a switch for comparisons).
AUTO_LSE = True
_flex = None


def compiled_flex():
    """``torch.compile(flex_attention)``, built once: eager flex materialises every score and ignores
    the block structure (it only applies ``mask_mod``).

    Every new layout (clip length, views, resolution) and grad mode compiles a new graph; past
    dynamo's recompile limit (8 by default) flex silently falls back to that eager path, which at
    paper sizes asks for terabytes (seen on the H100). The limit is raised to 64 here."""
    global _flex
    if _flex is None:
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 64)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 512)
        _flex = torch.compile(flex_attention, dynamic=False)
    return _flex


def per_view_attention(q: Tensor, k: Tensor, v: Tensor, layout: GridLayout) -> Tensor:
    """Attention within each view: ``[B, H, N, D]`` -> ``[B, H, N, D]`` (V dense SDPA calls in one)."""
    B, H, N, D = q.shape
    V = layout.views

    def split(x: Tensor) -> Tensor:
        return x.reshape(B, H, V, N // V, D).transpose(1, 2).reshape(B * V, H, N // V, D)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.reshape(B, V, H, N // V, D).transpose(1, 2).reshape(B, H, N, D)


def grid_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: GridLayout, mask: ViewTimeMask, backend: str = "auto"
) -> Tensor:
    """Masked attention of ``q, k, v [B, H, N, D]`` (tokens in ``layout`` order) -> ``[B, H, N, D]``.

    ``backend``: ``flex`` (block-sparse), ``dense`` (reference), ``lse`` (view-OR-time masks only:
    :func:`~fourdgen.nn.lse_attention.view_time_attention`) or ``auto``: on CUDA flex (``lse`` where
    the mask is exactly view-OR-time and a fused kernel (cuDNN / flash) takes ``q``); on CPU
    dense (compiled flex is slow to build there and the tests' layouts are small)."""
    if q.shape[-2] != layout.num_tokens:
        raise ValueError(f"grid_attention: {q.shape[-2]} tokens, layout {layout} has {layout.num_tokens}")
    if backend not in BACKENDS:
        raise ValueError(f"grid_attention: backend must be one of {BACKENDS}, got {backend!r}")
    if mask.terms == ("same_view",):
        return per_view_attention(q, k, v, layout)
    if backend == "auto":
        if not q.is_cuda:
            backend = "dense"
        else:
            backend = "lse" if AUTO_LSE and mask.is_view_or_time(layout) and fused_kernel(q) else "flex"
    if backend == "lse":
        if not mask.is_view_or_time(layout):
            raise ValueError(
                f"grid_attention: backend 'lse' computes same_view | same_time only, not {mask} on "
                f"{layout}; use 'flex'"
            )
        return view_time_attention(q, k, v, layout)
    if backend == "dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(layout, q.device))
    return compiled_flex()(
        q, k, v, block_mask=mask.block_mask(layout, q.device), kernel_options=flex_kernel_options(q)
    )


def flex_kernel_options(q: Tensor) -> dict | None:
    """Flex kernel options measured fastest on an H100 (benchmarks/RESULTS.md: 8 views x 8 frames x
    1560 tokens, forward 125 -> 112 ms): 128 x 128 tiles, 8 warps, 3 stages, TMA loads. Hopper and
    16-bit inputs with head_dim <= 128 only; elsewhere flex's defaults."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 128:
        return None
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return None
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": True}


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's rotary embedding on interleaved pairs (as diffusers' ``WanAttnProcessor``):
    ``x [B, N, H, D]``, ``cos/sin [1, N, 1, D]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


class GridAttentionState:
    """What the grid processors read during a DiT call (set by the coupling before each call and
    kept until the next, so that recomputation under gradient checkpointing sees it too).

    Attributes:
        mask: the fused mask; backend: see :func:`grid_attention`.
        layout: the current :class:`GridLayout` (None: not in a grid call).
        camera: ``[B, V, 12]`` per-view relative ``[R|t]`` (Full-4D), or None.
        reference: ``[B, C, V F, h', w']`` reference latents, zeros elsewhere (4Real-Video-V2), or None.
    """

    def __init__(self, mask: ViewTimeMask, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"GridAttentionState: backend must be one of {BACKENDS}, got {backend!r}")
        self.mask, self.backend = mask, backend
        self.layout: GridLayout | None = None
        self.camera: Tensor | None = None
        self.reference: Tensor | None = None

    def require_layout(self) -> GridLayout:
        if self.layout is None:
            raise RuntimeError(
                "grid attention called without a layout: call the DiT through the grid coupling "
                "(it sets GridAttentionState.layout)"
            )
        return self.layout


def self_attention(attn: nn.Module, x: Tensor, rotary_emb, attend) -> Tensor:
    """Wan self-attention of ``x [B, N, dim]`` with ``attend(q, k, v)`` on ``[B, H, N, D]``."""
    q, k, v = _get_qkv_projections(attn, x, None)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    if rotary_emb is not None:
        q, k = apply_rope(q, *rotary_emb), apply_rope(k, *rotary_emb)
    q, k = q.to(v.dtype), k.to(v.dtype)  # autocast may leave the normed q/k in float32; flex needs one dtype
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    out = out.flatten(2).type_as(x)
    return attn.to_out[1](attn.to_out[0](out))


class FusedViewTimeProcessor:
    """4Real-Video-V2: Wan self-attention with the fused view-time mask, same weights (no new
    parameters). Also the processor of Full-4D's copied branch."""

    def __init__(self, state: GridAttentionState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        layout = self.state.require_layout()
        mask, backend = self.state.mask, self.state.backend
        return self_attention(
            attn, hidden_states, rotary_emb, lambda q, k, v: grid_attention(q, k, v, layout, mask, backend)
        )


class BranchedViewTimeProcessor:
    """Full-4D: the original per-video self-attention (each view its own video, frozen or LoRA)
    plus a trainable copy running the fused mask, added through a zero-initialised linear layer,
    plus the view's camera embedding (zero-initialised encoder) added after self-attention.

    ``out = attn_per_view(x) + proj(copy_fused(x)) + camera_encoder([R|t]_view)``: at
    initialisation this is exactly the base model's per-view self-attention. The camera term is
    added to the attention output, i.e. before Wan's adaLN gate (the paper says "added to features
    after self-attention" without naming the side of the gate).
    """

    def __init__(self, state: GridAttentionState, fused: nn.Module, proj: nn.Linear, camera: nn.Linear):
        self.state, self.fused, self.proj, self.camera = state, fused, proj, camera

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        layout = self.state.require_layout()
        base = self_attention(
            attn, hidden_states, rotary_emb, lambda q, k, v: per_view_attention(q, k, v, layout)
        )
        fused = self.fused(hidden_states, None, None, rotary_emb)
        out = base + self.proj(fused)
        cam = self.state.camera
        if cam is not None:
            emb = self.camera(cam.to(self.camera.weight.dtype))  # [B, V, dim]
            out = out + emb.repeat_interleave(layout.frames * layout.frame_tokens, dim=1).to(out.dtype)
        return out


def zero_linear(n_in: int, n_out: int, like: nn.Module) -> nn.Linear:
    """A ``Linear`` with zero weight and bias on ``like``'s device and dtype."""
    w = next(like.parameters())
    lin = nn.Linear(n_in, n_out, device=w.device, dtype=w.dtype)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin
