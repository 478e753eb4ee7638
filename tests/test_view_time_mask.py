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


# --- the source view travels with the layout (Full-4D's cross-half term) ------------------------

FULL4D = ("same_view", "same_time", "cross_half")


def _source_layout(k: int) -> GridLayout:
    """3 views x (2 target + 2 condition) frames x 2 tokens, source row ``k``."""
    return GridLayout(3, 4, 1, 2, target_frames=2, source_view=k)


def padded_enumeration(layout: GridLayout, terms, source_view: int, P: int) -> torch.Tensor:
    """The mask on a sequence whose frames are padded to ``P`` tokens, index by index: padding keys
    are masked, padding queries keep their frame's row."""
    V, Fr, n = layout.views, layout.frames, layout.frame_tokens
    frame = enumerated(GridLayout(V, Fr, 1, 1, target_frames=layout.targets), terms, source_view)
    N = V * Fr * P
    m = torch.zeros(N, N, dtype=torch.bool)
    for q in range(N):
        for kv in range(N):
            m[q, kv] = bool(frame[q // P, kv // P]) and kv % P < n
    return m


@pytest.mark.parametrize("k", [0, 1, 2])
def test_cross_half_reads_the_layouts_source_view(k):
    """``dense``, ``frames``, ``mask_mod`` on every index pair (plain and padded) and the block mask
    (its structure and its mask_mod) all equal the token-by-token enumeration with source row k."""
    layout = _source_layout(k)
    mask = ViewTimeMask(FULL4D)
    ref = enumerated(layout, FULL4D, source_view=k)
    n, N = layout.frame_tokens, layout.num_tokens
    assert torch.equal(mask.dense(layout), ref)
    assert torch.equal(mask.frames(layout), ref[::n, ::n])
    q, kv = torch.arange(N)[:, None].expand(N, N), torch.arange(N)[None].expand(N, N)
    assert torch.equal(mask.mask_mod(layout)(0, 0, q, kv), ref)
    P = 3
    Np = layout.num_frames * P
    qp, kvp = torch.arange(Np)[:, None].expand(Np, Np), torch.arange(Np)[None].expand(Np, Np)
    got = mask.mask_mod(layout, pad_to=P)(0, 0, qp, kvp)
    assert torch.equal(got, padded_enumeration(layout, FULL4D, k, P))
    # Spelled out: view w's first target token sees view k's condition frames, no other view's
    # (its own through same_view).
    for w in range(3):
        for v in range(3):
            cond_key = (v * 4 + 2) * n  # view v, first condition frame
            assert bool(ref[w * 4 * n, cond_key]) == (v in (k, w)), (w, v)
    # Block mask (3-token blocks straddle the 2-token frames: full, partial and skipped blocks).
    block = 3
    bm = mask.block_mask(layout, block=block)
    assert torch.equal(bm.mask_mod(0, 0, q, kv), ref)
    nb = -(-N // block)
    full, partial = set(), set()
    for qb in range(nb):
        for j in range(int(bm.kv_num_blocks[0, 0, qb])):
            partial.add((qb, int(bm.kv_indices[0, 0, qb, j])))
        for j in range(int(bm.full_kv_num_blocks[0, 0, qb])):
            full.add((qb, int(bm.full_kv_indices[0, 0, qb, j])))
    want_full, want_partial = set(), set()
    for qb in range(nb):
        for kb in range(nb):
            tile = ref[qb * block : (qb + 1) * block, kb * block : (kb + 1) * block]
            if tile.all():
                want_full.add((qb, kb))
            elif tile.any():
                want_partial.add((qb, kb))
    assert (full, partial) == (want_full, want_partial)
    assert want_full and want_partial  # the case exercises both kinds


def test_source_view_is_part_of_the_block_mask_cache_key_and_validated():
    mask = ViewTimeMask(FULL4D)
    masks = [mask.block_mask(_source_layout(k), block=3) for k in range(3)]
    assert len({id(m) for m in masks}) == 3
    assert mask.block_mask(_source_layout(1), block=3) is masks[1]
    assert not torch.equal(mask.dense(_source_layout(0)), mask.dense(_source_layout(2)))
    with pytest.raises(ValueError, match="source_view"):
        GridLayout(3, 4, 1, 2, target_frames=2, source_view=3)
