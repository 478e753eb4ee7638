"""Grid token layout, fused view-time masks and the attention paths against plain references."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fourdgen.nn.fused_attention import apply_rope, compiled_flex, grid_attention, per_view_attention
from fourdgen.nn.grid_layout import GridLayout, grid_to_sequence, sequence_to_grid
from fourdgen.nn.view_time_mask import ViewTimeMask, block_structure, computed_fraction


def enumerated(layout: GridLayout, terms, source_view: int = 0) -> torch.Tensor:
    """The mask by its definition, token by token (no shared code with the module)."""
    V, Fr, n, T = layout.views, layout.frames, layout.frame_tokens, layout.targets
    coords = [(v, f) for v in range(V) for f in range(Fr) for _ in range(n)]
    N = len(coords)
    m = torch.zeros(N, N, dtype=torch.bool)
    for i, (vq, fq) in enumerate(coords):
        for j, (vk, fk) in enumerate(coords):
            ok = ("same_view" in terms and vq == vk) or ("same_time" in terms and fq == fk)
            ok = ok or ("cross_half" in terms and fq < T and fk >= T and vk == source_view)
            ok = ok or ("same_frame" in terms and vq == vk and fq == fk)
            m[i, j] = ok
    return m


LAYOUTS = [
    GridLayout(2, 3, 1, 2),
    GridLayout(3, 2, 2, 1),
    GridLayout(2, 4, 1, 1, target_frames=2),
    GridLayout(3, 4, 1, 2, target_frames=2),
]
TERMS = [("same_view",), ("same_time",), ("same_view", "same_time"), ("same_view", "same_time", "cross_half")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("terms", TERMS)
def test_mask_equals_definition(layout, terms):
    mask = ViewTimeMask(terms)
    assert torch.equal(mask.dense(layout), enumerated(layout, terms))


def test_token_order_and_positions():
    layout = GridLayout(views=3, frames=2, height=2, width=3, t_max=5)
    lat = torch.arange(1 * 3 * 1 * 2 * 2 * 3).reshape(1, 3, 1, 2, 2, 3)  # [B, V, C, F, h, w]
    seq = grid_to_sequence(lat)  # [B, C, V F, h, w]
    assert torch.equal(sequence_to_grid(seq, 3), lat)
    flat = seq.flatten(2)[0, 0]  # Wan's patchify order: (frame, row, col) with frames = (view, frame)
    ids = layout.position_ids()
    for n in range(layout.num_tokens):
        v, rem = divmod(n, layout.frames * layout.frame_tokens)
        f, rem = divmod(rem, layout.frame_tokens)
        i, j = divmod(rem, layout.width)
        assert int(flat[n]) == int(lat[0, v, 0, f, i, j])
        assert ids[n].tolist() == [v * 5 + f, i, j]  # frame position v * t_max + t
    with pytest.raises(ValueError, match="t_max"):
        GridLayout(2, 6, 1, 1, t_max=4)


@pytest.mark.parametrize("block", [3, 4, 8])
def test_block_structure_covers_mask_exactly(block):
    """Full blocks lie inside the mask, skipped blocks outside it, partial blocks straddle it."""
    layout = GridLayout(3, 4, 1, 5, target_frames=2)
    mask = ViewTimeMask(("same_view", "same_time", "cross_half"))
    dense = mask.dense(layout)
    full, partial = block_structure(mask.frames(layout), layout, block)
    N = layout.num_tokens
    for qb, kb in itertools.product(range(full.shape[0]), repeat=2):
        tile = dense[qb * block : min(N, (qb + 1) * block), kb * block : min(N, (kb + 1) * block)]
        assert bool(full[qb, kb]) == bool(tile.all())
        assert bool(partial[qb, kb]) == bool(tile.any() and not tile.all())


def test_block_mask_fast_to_build_at_paper_scale():
    """8 views x 8 frames x 1560 tokens (Wan-14B, 480p, 29 frames): no N x N tensor, milliseconds."""
    import time

    layout = GridLayout(8, 8, 30, 52)
    mask = ViewTimeMask(("same_view", "same_time"))
    t0 = time.perf_counter()
    bm = mask.block_mask(layout)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0  # seconds on a slow CPU; the benchmark records the GPU figure
    assert mask.block_mask(layout) is bm  # cached
    frac = computed_fraction(bm)
    assert mask.density(layout) <= frac < mask.density(layout) + 0.05  # 23.4% of pairs, ~25% of blocks


def qkv(layout, B=1, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, layout.num_tokens, D, generator=g, requires_grad=True) for _ in range(3)]


def test_per_view_attention_is_same_view_mask():
    layout = GridLayout(3, 2, 2, 3)
    q, k, v = qkv(layout)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ViewTimeMask(("same_view",)).dense(layout))
    torch.testing.assert_close(per_view_attention(q, k, v, layout), ref)


@pytest.mark.slow
def test_flex_matches_dense_forward():
    """Compiled FlexAttention with the built block mask (full, partial and skipped blocks, a frame
    size that is not a multiple of the block) equals dense masked SDPA. Forward only: flex has no
    CPU backward; tests/gpu/test_grid_gpu.py checks forward and backward on CUDA."""
    layout = GridLayout(3, 4, 10, 13, target_frames=2)  # 130-token frames, 1560 tokens
    mask = ViewTimeMask(("same_view", "same_time", "cross_half"))
    q, k, v = (t.detach() for t in qkv(layout, D=16))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(layout))
    out = compiled_flex()(q, k, v, block_mask=mask.block_mask(layout))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_grid_attention_dense_backend_and_errors():
    layout = GridLayout(2, 2, 1, 3)
    mask = ViewTimeMask(("same_view", "same_time"))
    q, k, v = qkv(layout)
    out = grid_attention(q, k, v, layout, mask, "auto")  # CPU: dense
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=enumerated(layout, mask.terms))
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="tokens"):
        grid_attention(q[:, :, :5], k, v, layout, mask)
    with pytest.raises(ValueError, match="terms"):
        ViewTimeMask(("same_place",))


def test_apply_rope_matches_diffusers():
    """Our rotary helper equals diffusers' Wan processor on the same tensors."""
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    from fourdgen.nn.fused_attention import self_attention

    torch.manual_seed(0)
    attn = WanAttention(dim=32, heads=2, dim_head=16, processor=WanAttnProcessor())
    x = torch.randn(2, 6, 32)
    cos, sin = torch.randn(1, 6, 1, 16), torch.randn(1, 6, 1, 16)
    ref = attn(x, None, None, (cos, sin))
    out = self_attention(attn, x, (cos, sin), lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(out, ref)
    assert apply_rope(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4), torch.zeros(1, 1, 1, 4)).sum() == 4
