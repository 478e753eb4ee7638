"""Exact view-OR-time attention from two dense attentions merged through their log-sum-exp.

4Real-Video-V2's fused mask lets the token of (view v, frame f) attend to the keys of view v (any
frame) OR of frame f (any view). As key sets, that union splits into two disjoint ones::

    view(v) | time(f) = view(v) + others(v, f),     others(v, f) = frame f of the views != v

and with ``Z_X = sum_{j in X} exp(s_j) = exp(L_X)`` and ``O_X`` the ordinary attention over X alone,
the attention over the union is exactly ``O = (Z_view O_view + Z_others O_others) / (Z_view + Z_others)``
(no subtraction: nothing cancels). Each part is a dense attention that fused kernels (cuDNN, flash)
run at full speed with no mask:

- view: ``B V`` batches of ``F S`` tokens (a reshape of the grid order);
- others: for each (batch, frame), ``V`` batches of ``S`` queries against ``(V - 1) S`` keys. The
  keys of view v are views ``v + 1 .. v + V - 1`` (mod V) of the frame: a contiguous window of the
  frame's views laid out as ``1 .. V - 1, 0 .. V - 2`` (:func:`cycled`, ``2V - 2`` views), so the
  ``V`` windows are one overlapping strided view of one copy of k and v
  (:func:`~.attention_kernels.windows`; fused kernels read any strides, nothing is copied per
  window). The queries are read in place (:func:`frame_batches`).

with ``S = h w`` tokens per frame (:class:`~fourdgen.nn.grid_layout.GridLayout` order: view, frame,
token). The parts compute exactly the mask's pairs. An earlier version merged view + time - frame
(inclusion-exclusion): 13% more pairs on an 8 x 8 grid, a third attention and a cancelling merge; on
the H200 the others part runs in 43 ms against 52 ms for time + frame forward, 114 against 141 ms
backward (``benchmarks/RESULTS.md``, issue 21 P1).

The backward is ring attention's: each part's backward kernel, called with the MERGED output and
MERGED log-sum-exp, returns exactly its share of the union's gradient (see
:meth:`ViewTimeLSE.backward`); the windows' key gradients are folded back onto their views.

Kernels (``kernel=``): :mod:`.attention_kernels`' ``cudnn`` / ``flash`` (CUDA, fp16/bf16),
``cpu_flash`` (CPU) and ``math`` (the reference).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import product

import torch
import torch.nn.functional as F
from torch import Tensor

from fourdgen.nn.attention_kernels import KERNEL_FNS, acc_dtype, resolve_kernel
from fourdgen.nn.grid_layout import GridLayout

# --- layouts ------------------------------------------------------------------------------------


def _heads_inner(x: Tensor) -> bool:
    """Whether heads lie inside tokens in memory (``[B, N, H, D]`` transposed, as the DiT gives)."""
    return x.stride(1) < x.stride(2)


def view_batches(x: Tensor, views: int) -> Tensor:
    """Grid-ordered ``x [B, H, N, D]`` -> ``[B V, H, F S, D]``, one batch per view (a view of ``x``
    where its memory allows)."""
    B, H, N, D = x.shape
    return x.unflatten(2, (views, -1)).transpose(1, 2).reshape(B * views, H, N // views, D)


def view_grid(y: Tensor, views: int, frames: int) -> Tensor:
    """Inverse of :func:`view_batches` as a view: ``[B V, H, F S, D]`` -> ``[B, H, V, F, S, D]``."""
    return y.unflatten(0, (-1, views)).unflatten(3, (frames, -1)).permute(0, 2, 1, 3, 4, 5)


def frame_batches(x: Tensor, views: int, frames: int) -> Tensor:
    """Grid-ordered ``x [B, H, N, D]`` -> ``[B, F, V, H, S, D]`` (a view, no copy): for each (batch,
    frame) the frame's tokens of every view, one batch per view."""
    return x.unflatten(2, (views, frames, -1)).permute(0, 3, 2, 1, 4, 5)


def cycled(x: Tensor, views: int, frames: int) -> Tensor:
    """Grid-ordered ``x [B, H, N, D]`` -> ``[B, F, 2V - 2, S, H, D]``, a copy: each frame's views
    ``1 .. V - 1`` then ``0 .. V - 2``, so that the keys of every view's others lie at one token
    stride (:func:`windows`). In memory heads stay where ``x`` has them (inner: ``[B, F, 2V - 2, S,
    H, D]``, outer: ``[B, H, F, 2V - 2, S, D]``), so the copy moves whole frames of a view at a time
    (a transposing copy ran at a quarter of the memory bandwidth). One copy kernel: 2 - 2/V times
    the tensor written."""
    src = x.unflatten(2, (views, frames, -1))  # [B, H, V, F, S, D]
    if _heads_inner(x):
        src = src.permute(0, 3, 2, 4, 1, 5)  # [B, F, V, S, H, D]
        return torch.cat([src[:, :, 1:], src[:, :, :-1]], dim=2)
    src = src.transpose(2, 3)  # [B, H, F, V, S, D]
    return torch.cat([src[:, :, :, 1:], src[:, :, :, :-1]], dim=3).permute(0, 2, 3, 4, 1, 5)


def fold(dw: Tensor, views: int) -> Tensor:
    """Key gradients of :func:`windows` ``dw [V, H, (V - 1) S, D]`` -> their views' ``[V, H, S, D]``:
    block j of window v belongs to view ``(v + 1 + j) mod V`` (summed in fp32, returned in ``dw``'s
    dtype)."""
    V = views
    blocks = dw.unflatten(2, (V - 1, -1))  # [V, H, V-1, S, D]
    a = acc_dtype(dw.dtype)
    acc = torch.roll(blocks[:, :, 0].to(a), 1, 0)
    for j in range(1, V - 1):
        acc = acc + torch.roll(blocks[:, :, j].to(a), 1 + j, 0)
    return acc.to(dw.dtype)


# Eager CUDA runs the k/v copies on a side stream, so that these memory-bound copies overlap the
# view part's compute-bound kernel (a compiled graph fuses them with their producers instead).
overlap_copies = True
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _cycled_kv(k: Tensor, v: Tensor, views: int, frames: int) -> Callable[[], tuple[Tensor, Tensor]]:
    """Starts :func:`cycled` of k and v; the returned function waits for them and returns them."""
    if not (k.is_cuda and overlap_copies) or torch.compiler.is_compiling():
        kc, vc = cycled(k, views, frames), cycled(v, views, frames)
        return lambda: (kc, vc)
    main = torch.cuda.current_stream(k.device)
    side = _side_streams.setdefault(k.device, torch.cuda.Stream(k.device))
    side.wait_stream(main)
    with torch.cuda.stream(side):
        kc, vc = cycled(k, views, frames), cycled(v, views, frames)

    def join():
        main.wait_stream(side)
        for x in (kc, vc):
            x.record_stream(main)  # allocated on the side stream, used and freed on the main one
        return kc, vc

    return join


# --- merge and gradient sum (pointwise; compiled into one kernel each on CUDA) -------------------


def merge(ov, oo, lv, lo):
    """``(view, others)`` outputs ``[..., D]`` and log-sum-exps ``[...]`` of two disjoint key sets
    -> their union's output (input dtype) and log-sum-exp, computed in fp32 (fp64 for fp64
    inputs). Stable: both weights are ``exp(L_X - max) <= 1`` and their sum is ``>= 1``."""
    a = acc_dtype(ov.dtype)
    lv, lo = lv.to(a), lo.to(a)
    m = torch.maximum(lv, lo)
    wv, wo = torch.exp(lv - m), torch.exp(lo - m)
    den = wv + wo
    return ((wv[..., None] * ov.to(a) + wo[..., None] * oo.to(a)) / den[..., None]).to(
        ov.dtype
    ), m + torch.log(den)


def combine(gv, go):
    """Gradient over the union = view's + others' (summed in fp32, returned in input dtype)."""
    a = acc_dtype(gv.dtype)
    return (gv.to(a) + go.to(a)).to(gv.dtype)


_compiled: dict[str, Callable] = {}


def _pointwise(fn: Callable, x: Tensor) -> Callable:
    """``fn`` compiled (one fused kernel) when ``x`` is on CUDA, unless we are already inside a
    compiled graph (dynamo then fuses it with the rest); eager elsewhere."""
    if not x.is_cuda or torch.compiler.is_compiling():
        return fn
    if fn.__name__ not in _compiled:  # static first, dynamic shapes from a second layout on
        _compiled[fn.__name__] = torch.compile(fn)
    return _compiled[fn.__name__]


def _physical(x6: Tensor, heads_inner: bool) -> Tensor:
    """``[B, H, V, F, S, D]`` -> the order the result should have in memory (heads inner or not)."""
    return x6.permute(0, 2, 3, 4, 1, 5) if heads_inner else x6


def _logical(x6: Tensor, heads_inner: bool) -> Tensor:
    return x6.permute(0, 4, 1, 2, 3, 5) if heads_inner else x6


def _others_grid(y: Tensor) -> Tensor:
    """The others part's per-frame results stacked ``[B, F, V, H, S, ...]`` -> ``[B, H, V, F, S, ...]``."""
    return y.permute(0, 3, 2, 1, *range(4, y.dim()))


# --- forward and backward (lists, not generators: dynamo fails on generators here) ---------------


def lse_forward(q, k, v, views, frames, kernel, scale) -> tuple[Tensor, Tensor, list]:
    """``q, k, v [B, H, N, D]`` -> ``out [B, H, N, D]`` (q's layout), ``lse [B, H, N]`` (contiguous,
    accumulation dtype) and the kernels' aux tensors (the view part's, then one per frame)."""
    fn, V, B = KERNEL_FNS[kernel], views, q.shape[0]
    copies = _cycled_kv(k, v, V, frames)
    ov, lv, aux_v = fn.fwd(*[view_batches(x, V) for x in (q, k, v)], scale)
    qf = frame_batches(q, V, frames)  # [B, F, V, H, S, D], strided: read in place
    kc, vc = copies()
    outs, lses, aux = [], [], [aux_v]
    for b, f in product(range(B), range(frames)):
        o, lse, extra = fn.fwd(qf[b, f], kc[b, f], vc[b, f], scale, V)
        outs.append(o)
        lses.append(lse)
        aux.append(extra)
    oo = torch.stack(outs).unflatten(0, (B, frames))  # [B, F, V, H, S, D]
    lo = torch.stack(lses).unflatten(0, (B, frames))  # [B, F, V, H, S]
    hi = _heads_inner(q)
    o6, lse5 = _pointwise(merge, q)(
        _physical(view_grid(ov, V, frames), hi),
        _physical(_others_grid(oo), hi),
        _physical(view_grid(lv[..., None], V, frames), hi)[..., 0],
        _physical(_others_grid(lo)[..., None], hi)[..., 0],
    )
    out = _logical(o6.contiguous(), hi).reshape(q.shape)  # a view: o6 is q-ordered in memory
    lse = _logical(lse5[..., None], hi)[..., 0].reshape(q.shape[:3]).contiguous()
    return out, lse, aux


def lse_backward(do, q, k, v, out, lse, aux, views, frames, kernel, scale):
    """Gradients of q, k, v (q's layout) from each part's backward with the merged out and lse."""
    fn, V, B = KERNEL_FNS[kernel], views, q.shape[0]
    copies = _cycled_kv(k, v, V, frames)  # not kept from the forward: activation memory
    view_grads = fn.bwd(
        *[view_batches(x, V) for x in (do, q, k, v, out)],
        view_batches(lse[..., None], V)[..., 0], aux[0], scale,
    )  # fmt: skip
    # others: q, out and dO are read in place
    qf, of, dof = [frame_batches(x, V, frames) for x in (q, out, do)]
    lf = frame_batches(lse[..., None], V, frames)[..., 0]  # [B, F, V, H, S]
    kc, vc = copies()
    folded = _pointwise(fold, q)
    grads = [[], [], []]
    for i, (b, f) in enumerate(product(range(B), range(frames))):
        dq, dk, dv = fn.bwd(dof[b, f], qf[b, f], kc[b, f], vc[b, f], of[b, f], lf[b, f], aux[1 + i], scale, V)
        for g, x in zip(grads, (dq, folded(dk, V), folded(dv, V)), strict=True):
            g.append(x)
    hi = _heads_inner(q)
    res = []
    for x, gv, go in zip((q, k, v), view_grads, grads, strict=True):
        others = _others_grid(torch.stack(go).unflatten(0, (B, frames)))
        g6 = _pointwise(combine, q)(_physical(view_grid(gv, V, frames), hi), _physical(others, hi))
        res.append(_logical(g6.contiguous(), hi).reshape(x.shape))
    return res


class ViewTimeLSE(torch.autograd.Function):
    """View-OR-time attention ``q, k, v [B, H, N, D] -> [B, H, N, D]`` (``V, F >= 2``)."""

    @staticmethod
    def forward(ctx, q, k, v, views: int, frames: int, kernel: str, scale: float):
        # Autocast off: the inputs' dtype picks the kernel, and the math kernel's matmuls and the
        # merge must stay in the accumulation dtype.
        with torch.autocast(q.device.type, enabled=False):
            out, lse, aux = lse_forward(q, k, v, views, frames, kernel, scale)
        flat = [t for a in aux for t in a]
        ctx.save_for_backward(q, k, v, out, lse, *flat)
        ctx.aux_sizes = [len(a) for a in aux]
        ctx.views, ctx.frames, ctx.kernel, ctx.scale = views, frames, kernel, scale
        return out

    @staticmethod
    def backward(ctx, do):
        # Why the parts' backward kernels give the exact gradient: over the union U of a query's
        # keys, with the merged L and O, P_j = exp(s_j - L) and
        #     dS_j = P_j (dO . v_j - rowsum(dO * O)),     dv_j = P_j dO,     dq = sum_j dS_j k_j.
        # Each term depends on (q, k_j, v_j, dO) and on the merged O and L only. A part's kernel
        # called with (O, L) therefore computes these same P_j, dS_j for the keys j of its part;
        # view and others are disjoint and cover U, so the sum of the two parts' gradients counts
        # each pair's contribution exactly once (pair by pair, for dq, dk and dv alike).
        q, k, v, out, lse, *flat = ctx.saved_tensors
        aux, i = [], 0
        for n in ctx.aux_sizes:
            aux.append(tuple(flat[i : i + n]))
            i += n
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = lse_backward(
                do, q, k, v, out, lse, aux, ctx.views, ctx.frames, ctx.kernel, ctx.scale
            )
        return dq, dk, dv, None, None, None, None


def view_time_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: GridLayout, kernel: str = "auto", scale: float | None = None
) -> Tensor:
    """Exact ``same_view | same_time`` attention of ``q, k, v [B, H, N, D]`` (``layout`` order)
    -> ``[B, H, N, D]``, differentiable.

    ``kernel``: ``auto`` (:func:`fused_kernel`, else ``math``) or one of :data:`KERNELS`. With one
    view (or one frame) the union is every token: plain dense SDPA."""
    if q.shape[-2] != layout.num_tokens:
        raise ValueError(
            f"view_time_attention: {q.shape[-2]} tokens, layout {layout} has {layout.num_tokens}"
        )
    if layout.views == 1 or layout.frames == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    kernel = resolve_kernel(q, kernel)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return ViewTimeLSE.apply(q, k, v, layout.views, layout.frames, kernel, scale)
