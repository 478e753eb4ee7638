"""Model FLOPs of a step and MFU (fourdgen.metrics.flops), against counts done by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock

from fourdgen.metrics.flops import FlopSplit, count_flops, matmul_rate, mfu


def test_linear_and_cpu_attention_are_counted_by_hand_formulas():
    q, k, v = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 24, 16), torch.randn(2, 3, 24, 16)
    lin = torch.nn.Linear(16, 32)
    split = count_flops(lambda: (F.scaled_dot_product_attention(q, k, v), lin(torch.randn(10, 16))))
    # QK^T: 2*B*H*Nq*Nk*D, PV: 2*B*H*Nq*Nk*Dv (torch's registry skips the CPU kernel: we add it)
    assert split.attention == 2 * 2 * 3 * 40 * 24 * 16 + 2 * 2 * 3 * 40 * 24 * 16
    assert split.matmul == 2 * 10 * 16 * 32
    assert split.total == split.attention + split.matmul


def test_wan_block_counts_every_projection_and_both_attentions():
    dim, ffn, heads, L = 64, 128, 4, 12
    block = WanTransformerBlock(
        dim, ffn, heads, qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6
    )
    rope = WanRotaryPosEmbed(dim // heads, (1, 2, 2), 64)(torch.randn(1, 4, 2, 12, 16))  # 2 x 6 x 8 tokens
    N = 2 * 6 * 8
    x, ctx, temb = torch.randn(1, N, dim), torch.randn(1, L, dim), torch.randn(1, 6, dim)
    split = count_flops(lambda: block(x, ctx, temb, rope))
    self_proj = 4 * 2 * N * dim * dim  # q, k, v, out over the video tokens
    cross_proj = 2 * 2 * N * dim * dim + 2 * 2 * L * dim * dim  # q, out over video; k, v over text
    ffn_proj = 2 * 2 * N * dim * ffn
    assert split.matmul == self_proj + cross_proj + ffn_proj
    assert split.attention == 4 * N * N * dim + 4 * N * L * dim


def test_lora_step_and_mfu_follow_the_benchmark_convention():
    split = FlopSplit(matmul=10, attention=4)
    assert split.lora_step() == 2 * 10 + 3 * 4  # frozen base: no weight grads; attention fwd + bwd
    assert mfu(2e12, 1.0, 4e12) == pytest.approx(0.5)
    assert matmul_rate("cpu", n=64, dtype=torch.float32, iters=2) > 0
