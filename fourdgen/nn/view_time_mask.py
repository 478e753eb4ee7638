"""Fused view-time attention masks over a :class:`~fourdgen.nn.grid_layout.GridLayout`.

A mask is the OR of named predicates on the (view, frame) of a query token and a key token:

- ``same_view``: ``v_q == v_k`` (intra-view: a view attends across its frames, the per-video
  attention the base model was trained with);
- ``same_time``: ``f_q == f_k`` (intra-time: all views at one instant). With a condition half
  (Full-4D), condition frame ``f`` is its own instant, so target and condition frames meet only
  through ``same_view`` and ``cross_half``;
- ``cross_half``: ``f_q < F_target and f_k >= F_target and v_k == layout.source_view`` (Full-4D eq. 10:
  every generated token sees the source view's condition frames, i.e. the input video). The paper's
  formula did not survive extraction; this is our reading of its three conditions, "first half
  target, second half condition, key from the input video".
- ``same_frame``: ``v_q == v_k and f_q == f_k`` (a sub-term, for exact decompositions).

4Real-Video-V2 uses ``same_view | same_time``; Full-4D adds ``cross_half``. All predicates depend on
frames only, so the exact token mask is the frame mask ``[V F, V F]`` expanded by ``h w`` tokens, and
the block-sparse structure FlexAttention needs is derived from the frame mask at block granularity
(a few milliseconds; an ``N x N`` mask is never built on the fast path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from fourdgen.nn.grid_layout import GridLayout

Predicate = Callable[[GridLayout, Tensor, Tensor, Tensor, Tensor], Tensor]


def same_view(layout: GridLayout, vq: Tensor, fq: Tensor, vk: Tensor, fk: Tensor) -> Tensor:
    return vq == vk


def same_time(layout: GridLayout, vq: Tensor, fq: Tensor, vk: Tensor, fk: Tensor) -> Tensor:
    return fq == fk


def same_frame(layout: GridLayout, vq: Tensor, fq: Tensor, vk: Tensor, fk: Tensor) -> Tensor:
    return (vq == vk) & (fq == fk)


def cross_half(layout: GridLayout, vq: Tensor, fq: Tensor, vk: Tensor, fk: Tensor) -> Tensor:
    # The source view comes from the layout only: a separate argument is easy to leave at 0.
    T = layout.targets
    return (fq < T) & (fk >= T) & (vk == layout.source_view)


PREDICATES: dict[str, Predicate] = {
    "same_view": same_view,
    "same_time": same_time,
    "same_frame": same_frame,
    "cross_half": cross_half,
}
# Terms that attend to condition frames (``f >= target_frames``): on a layout without them they never
# hold, so the term would silently do nothing.
CONDITION_TERMS = ("cross_half",)


class ViewTimeMask:
    """The OR of named predicates (:data:`PREDICATES`); recipes list them, e.g.
    ``[same_view, same_time]`` (4Real-Video-V2) or ``[same_view, same_time, cross_half]`` (Full-4D).

    Block masks are cached per (layout, block size, device): every layer and step reuses one. The
    layout includes ``source_view``, so grids with different source rows never share a mask.
    """

    def __init__(self, terms: list[str] | tuple[str, ...] = ("same_view", "same_time")):
        unknown = [t for t in terms if t not in PREDICATES]
        if unknown or not terms:
            raise ValueError(
                f"ViewTimeMask: terms must be a non-empty list of {sorted(PREDICATES)}, got {terms}"
            )
        self.terms = tuple(terms)
        self._cache: dict[tuple, BlockMask] = {}

    def __repr__(self) -> str:
        return f"ViewTimeMask({list(self.terms)})"

    def frames(self, layout: GridLayout, device=None) -> Tensor:
        """Frame-level mask ``[V F, V F]`` bool (query frame, key frame)."""
        v, f = layout.frame_view_time(device)
        vq, fq, vk, fk = v[:, None], f[:, None], v[None], f[None]
        out = torch.zeros(layout.num_frames, layout.num_frames, dtype=torch.bool, device=device)
        for t in self.terms:
            out |= PREDICATES[t](layout, vq, fq, vk, fk)
        return out

    def dense(self, layout: GridLayout, device=None) -> Tensor:
        """The exact token mask ``[N, N]`` bool: the reference (small layouts only)."""
        n = layout.frame_tokens
        return self.frames(layout, device).repeat_interleave(n, 0).repeat_interleave(n, 1)

    def is_view_or_time(self, layout: GridLayout) -> bool:
        """Whether the mask on ``layout`` is exactly ``same_view | same_time`` (what
        :func:`~fourdgen.nn.lse_attention.view_time_attention` computes). ``same_frame`` lies inside
        both; ``cross_half`` never holds on a layout without condition frames. Pure Python on the
        terms (no tensors), so it is free inside a compiled graph."""
        terms = set(self.terms)
        if layout.targets == layout.frames:
            terms.discard("cross_half")
        return {"same_view", "same_time"} <= terms <= {"same_view", "same_time", "same_frame"}

    def density(self, layout: GridLayout) -> float:
        """Share of (query, key) token pairs that attend."""
        return float(self.frames(layout).float().mean())

    def block_mask(self, layout: GridLayout, device=None, block: int = 128) -> BlockMask:
        """FlexAttention :class:`BlockMask` (cached): key blocks entirely inside the mask are "full"
        (no per-element mask), blocks that straddle a frame boundary with mixed pairs are "partial"
        (``mask_mod`` looks up the frame mask), the rest are skipped."""
        device = torch.device(device or "cpu")
        key = (layout, block, str(device))
        if key not in self._cache:
            self._cache[key] = build_block_mask(self, layout, device, block)
        return self._cache[key]

    def mask_mod(self, layout: GridLayout, pad_to: int | None = None):
        """FlexAttention ``mask_mod`` of the token mask: views and frames are recomputed from the
        token indices by integer arithmetic (no table lookup, i.e. no memory load per score).
        ``pad_to``: tokens per frame in a sequence whose frames are padded to that many tokens
        (padding keys are masked)."""
        preds = [PREDICATES[t] for t in self.terms]
        n, F = layout.frame_tokens, layout.frames
        P = pad_to or n

        def mask_mod(b, h, q_idx, kv_idx):
            fq, fk = q_idx // P, kv_idx // P
            vq, tq, vk, tk = fq // F, fq % F, fk // F, fk % F
            out = preds[0](layout, vq, tq, vk, tk)
            for p in preds[1:]:
                out = out | p(layout, vq, tq, vk, tk)
            return out if n == P else out & ((kv_idx % P) < n)

        return mask_mod


def block_frames(layout: GridLayout, block: int, device=None) -> Tensor:
    """Incidence ``[num_blocks, V F]`` float: which frames each block of ``block`` tokens covers."""
    N, n = layout.num_tokens, layout.frame_tokens
    starts = torch.arange(0, N, block, device=device)
    lo, hi = starts // n, (torch.clamp(starts + block, max=N) - 1) // n
    f = torch.arange(layout.num_frames, device=device)
    return ((f[None] >= lo[:, None]) & (f[None] <= hi[:, None])).float()


def block_structure(frame_mask: Tensor, layout: GridLayout, block: int = 128) -> tuple[Tensor, Tensor]:
    """(``full``, ``partial``) ``[num_blocks, num_blocks]`` bool from the frame mask.

    A block pair's frame pairs are the product of the frames each block covers; counting allowed
    pairs with two small matmuls gives "all allowed" (full) and "some allowed" (partial) at once.
    """
    inc = block_frames(layout, block, frame_mask.device)
    allowed = inc @ frame_mask.float() @ inc.T
    pairs = inc.sum(1)[:, None] * inc.sum(1)[None]
    full = allowed == pairs
    return full, (allowed > 0) & ~full


def _kv_blocks(sel: Tensor) -> tuple[Tensor, Tensor]:
    """Selected key blocks per query block -> (counts ``[1, 1, nb]``, indices ``[1, 1, nb, nb]``)."""
    counts = sel.sum(-1, dtype=torch.int32)
    idx = torch.argsort(sel.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None], idx[None, None]


def build_block_mask(mask: ViewTimeMask, layout: GridLayout, device=None, block: int = 128) -> BlockMask:
    """A :class:`BlockMask` of ``mask`` on ``layout``, from its frame mask at block granularity."""
    full, partial = block_structure(mask.frames(layout, device), layout, block)
    mask_mod = mask.mask_mod(layout)
    kv_num, kv_idx = _kv_blocks(partial)
    full_num, full_idx = _kv_blocks(full)
    N = layout.num_tokens
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(N, N)
    )


def computed_fraction(mask: BlockMask) -> float:
    """Share of (query block, key block) pairs a block-sparse kernel computes (full + partial)."""
    nb_q, nb_k = mask.kv_indices.shape[-2], mask.kv_indices.shape[-1]
    n = mask.kv_num_blocks.sum() + (0 if mask.full_kv_num_blocks is None else mask.full_kv_num_blocks.sum())
    return float(n) / (nb_q * nb_k)
