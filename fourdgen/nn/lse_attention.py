"""Exact view-OR-time attention from three dense attentions merged through their log-sum-exp.

4Real-Video-V2's fused mask lets the token of (view v, frame f) attend to the keys of view v (any
frame) OR of frame f (any view). As key sets, ``view(v) | time(f)``, whose intersection is the
single frame ``(v, f)``. With ``Z_X = sum_{j in X} exp(s_j) = exp(L_X)`` and ``O_X`` the ordinary
attention over X alone, inclusion-exclusion gives the attention over the union exactly::

    Z = Z_view + Z_time - Z_frame,      O = (Z_view O_view + Z_time O_time - Z_frame O_frame) / Z

and every X is a dense attention over a batch of contiguous token blocks, which fused kernels
(cuDNN, flash) run at full speed with no mask:

- view:  ``B V`` batches of ``F S`` tokens (a reshape of the grid order),
- time:  ``B F`` batches of ``V S`` tokens (a permutation: one copy of q, k, v),
- frame: ``B V F`` batches of ``S`` tokens (a reshape),

with ``S = h w`` tokens per frame (:class:`~fourdgen.nn.grid_layout.GridLayout` order: view, frame,
token). Work: view + time + frame = union + 2 frame pairs, and the frame term is ``1 / (V + F - 1)``
of the union: 13% more pairs than the mask's own on an 8 x 8 grid.

The backward is ring attention's: each component's backward kernel, called with the MERGED output
and MERGED log-sum-exp, returns exactly its share of the union's gradient (see
:meth:`ViewTimeLSE.backward`).

Kernels (``kernel=``): ``cudnn`` / ``flash`` (CUDA, fp16/bf16), ``cpu_flash`` (CPU) and ``math``
(matmul softmax with a hand-written backward: anywhere, ``O(L^2)`` memory; the reference).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fourdgen.nn.grid_layout import GridLayout

aten = torch.ops.aten
KERNELS = ("auto", "cudnn", "flash", "cpu_flash", "math")
PARTS = ("view", "time", "frame")


# --- component kernels: (q, k, v [b, H, L, D]) -> out [b, H, L, D], lse [b, H, L] ---------------


class Kernel(NamedTuple):
    """``fwd(q, k, v, scale) -> (out, lse [b, H, L], aux)``; ``bwd(do, q, k, v, out, lse, aux,
    scale) -> (dq, dk, dv)`` where ``out, lse`` may be any (here: the merged) output and
    log-sum-exp. ``aux``: kernel tensors the backward wants back (tuple, may hold None)."""

    fwd: Callable
    bwd: Callable


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _math_fwd(q, k, v, scale):
    a = _acc(q.dtype)
    s = torch.matmul(q.to(a), k.to(a).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse[..., None]), v.to(a))
    return out.to(q.dtype), lse, ()


def _math_bwd(do, q, k, v, out, lse, aux, scale):
    # Softmax gradient with the probabilities rebuilt from the (given) log-sum-exp:
    # P = exp(s - L), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q.
    a = _acc(q.dtype)
    q_, k_, v_, do_ = q.to(a), k.to(a), v.to(a), do.to(a)
    p = torch.exp(torch.matmul(q_, k_.transpose(-1, -2)) * scale - lse.to(a)[..., None])
    dv = torch.matmul(p.transpose(-1, -2), do_)
    delta = (do_ * out.to(a)).sum(-1, keepdim=True)
    ds = p * (torch.matmul(do_, v_.transpose(-1, -2)) - delta) * scale
    dq, dk = torch.matmul(ds, k_), torch.matmul(ds.transpose(-1, -2), q_)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _cpu_flash_fwd(q, k, v, scale):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, lse, ()  # lse [b, H, L] (a transposed [b, L, H]); float64 for float64 inputs


def _cpu_flash_bwd(do, q, k, v, out, lse, aux, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, False, scale=scale
    )


def _cudnn_fwd(q, k, v, scale):
    # (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset, debug)
    r = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    b, H, L = q.shape[:3]
    # logsumexp is [b, H, L] before torch 2.9 and [b, H, L, 1] from 2.9 on: the backward gets it
    # back in the shape the forward gave (the dummy's shape carries it, also under fake tensors).
    return r[0], r[1].reshape(b, H, L), (r[6], r[7], r[1].new_empty((0,) * r[1].dim()))


def _cudnn_bwd(do, q, k, v, out, lse, aux, scale):
    seed, offset, like = aux
    lse = lse.contiguous()  # packed BHS: older cuDNN backward kernels ignore the stats' strides
    if like.dim() == 4:
        lse = lse.unsqueeze(-1)
    L, Lk = q.shape[2], k.shape[2]
    return aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, out, lse, seed, offset, None, None, None, L, Lk, 0.0, False, scale=scale
    )[:3]


def _flash_fwd(q, k, v, scale):
    # (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, rng_state/philox_seed, unused/offset, debug)
    r = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return r[0], r[1], (r[6], r[7])


def _flash_bwd(do, q, k, v, out, lse, aux, scale):
    seed, offset = aux
    L, Lk = q.shape[2], k.shape[2]
    return aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, out, lse.contiguous(), None, None, L, Lk, 0.0, False, seed, offset, scale=scale
    )[:3]


KERNEL_FNS = {
    "math": Kernel(_math_fwd, _math_bwd),
    "cpu_flash": Kernel(_cpu_flash_fwd, _cpu_flash_bwd),
    "cudnn": Kernel(_cudnn_fwd, _cudnn_bwd),
    "flash": Kernel(_flash_fwd, _flash_bwd),
}


@torch.compiler.assume_constant_result  # dynamo would break the graph on cudnn.version()
def _cudnn9() -> bool:
    return (torch.backends.cudnn.version() or 0) >= 90000


def fused_kernel(q: Tensor) -> str | None:
    """The fused kernel for ``q [B, H, N, D]``, or None (then only ``math``, small layouts).

    CUDA (Ampere on): cuDNN (the fastest dense attention on Hopper: benchmarks/RESULTS.md) for
    fp16/bf16 with ``D % 8 == 0, D <= 128``; flash for other fp16/bf16 ``D <= 256``. CPU: the CPU
    flash kernel."""
    D = q.shape[-1]
    if q.is_cuda:
        # get_device_properties, not get_device_capability: dynamo constant-folds the former.
        if (
            q.dtype not in (torch.float16, torch.bfloat16)
            or torch.cuda.get_device_properties(q.device).major < 8
        ):
            return None
        if D % 8 == 0 and D <= 128 and _cudnn9():
            return "cudnn"
        return "flash" if D % 8 == 0 and D <= 256 else None
    if q.device.type == "cpu":
        return "cpu_flash"
    return None


# --- layouts ------------------------------------------------------------------------------------


def _heads_inner(x: Tensor) -> bool:
    """Whether heads lie inside tokens in memory (``[B, N, H, D]`` transposed, as the DiT gives)."""
    return x.stride(1) < x.stride(2)


def batches(x: Tensor, part: str, views: int, frames: int) -> Tensor:
    """Grid-ordered ``x [B, H, N, D]`` -> ``[b, H, L, D]``, one batch per view / time / frame.

    view and frame split the token axis (a view where memory allows); time permutes it (a copy,
    keeping heads where ``x`` has them so the copy moves whole rows)."""
    B, H, N, D = x.shape
    V, Fr = views, frames
    S = N // (V * Fr)
    if part == "view":
        return x.unflatten(2, (V, Fr * S)).transpose(1, 2).reshape(B * V, H, Fr * S, D)
    if part == "frame":
        return x.unflatten(2, (V * Fr, S)).transpose(1, 2).reshape(B * V * Fr, H, S, D)
    y = x.unflatten(2, (V, Fr, S)).permute(0, 3, 1, 2, 4, 5)  # [B, F, H, V, S, D]
    if _heads_inner(x):
        y = y.permute(0, 1, 3, 4, 2, 5).contiguous().permute(0, 1, 4, 2, 3, 5)
    return y.reshape(B * Fr, H, V * S, D)


def grid(y: Tensor, part: str, views: int, frames: int) -> Tensor:
    """Inverse of :func:`batches` as a view: ``[b, H, L, D]`` -> ``[B, H, V, F, S, D]``."""
    V, Fr = views, frames
    if part == "view":
        return y.unflatten(0, (-1, V)).unflatten(3, (Fr, -1)).permute(0, 2, 1, 3, 4, 5)
    if part == "frame":
        return y.unflatten(0, (-1, V, Fr)).permute(0, 3, 1, 2, 4, 5)
    return y.unflatten(0, (-1, Fr)).unflatten(3, (V, -1)).permute(0, 2, 3, 1, 4, 5)


def _lse_batches(lse: Tensor, part: str, views: int, frames: int) -> Tensor:
    return batches(lse.unsqueeze(-1), part, views, frames).squeeze(-1)


def _lse_grid(lse: Tensor, part: str, views: int, frames: int) -> Tensor:
    return grid(lse.unsqueeze(-1), part, views, frames).squeeze(-1)


# --- merge and gradient sum (pointwise; compiled into one kernel each on CUDA) -------------------


def merge(ov, ot, of, lv, lt, lf):
    """``(view, time, frame)`` outputs ``[..., D]`` and log-sum-exps ``[...]`` -> the union's output
    (input dtype) and log-sum-exp, computed in fp32 (fp64 for fp64 inputs).

    Stable: weights are ``exp(L_X - max(L_view, L_time))`` <= 1 (``L_frame`` is below both: its key
    set is inside both). The union holds each of view and time, so ``Z >= max(Z_view, Z_time)``,
    i.e. the shifted denominator is >= 1 exactly; clamping it there only absorbs rounding (with
    ``V, F >= 2`` the union is strictly larger than the frame, and the cancellation amplifies the
    components' rounding at most 3x)."""
    a = _acc(ov.dtype)
    lv, lt, lf = lv.to(a), lt.to(a), lf.to(a)
    m = torch.maximum(lv, lt)
    wv, wt, wf = torch.exp(lv - m), torch.exp(lt - m), torch.exp(lf - m)
    den = (wv + wt - wf).clamp_min(1.0)
    num = wv[..., None] * ov.to(a) + wt[..., None] * ot.to(a) - wf[..., None] * of.to(a)
    return (num / den[..., None]).to(ov.dtype), m + torch.log(den)


def combine(gv, gt, gf):
    """Gradient over the union = view + time - frame (summed in fp32, returned in input dtype)."""
    a = _acc(gv.dtype)
    return (gv.to(a) + gt.to(a) - gf.to(a)).to(gv.dtype)


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


# --- forward and backward (lists, not generators: dynamo fails on generators here) ---------------


def _like(x: Tensor, ref: Tensor) -> Tensor:
    """``x`` with ``ref``'s strides (a copy if they differ). cuDNN caches its backward graph by the
    q/k/v strides only, so out and dO always come in q's layout, as in torch's own SDPA."""
    return x if x.stride() == ref.stride() else torch.empty_like(ref).copy_(x)


def lse_forward(q, k, v, views, frames, kernel, scale) -> tuple[Tensor, Tensor, list]:
    """``q, k, v [B, H, N, D]`` -> ``out [B, H, N, D]`` (q's layout), ``lse [B, H, N]`` (contiguous,
    accumulation dtype) and the kernels' aux tensors (3 parts, in :data:`PARTS` order)."""
    fn = KERNEL_FNS[kernel]
    outs, lses, aux = [], [], []
    for part in PARTS:
        o, lse, extra = fn.fwd(*[batches(x, part, views, frames) for x in (q, k, v)], scale)
        outs.append(grid(o, part, views, frames))
        lses.append(_lse_grid(lse, part, views, frames))
        aux.append(extra)
    hi = _heads_inner(q)
    o6, lse5 = _pointwise(merge, q)(
        *[_physical(o, hi) for o in outs], *[_physical(x[..., None], hi)[..., 0] for x in lses]
    )
    B, H, N, D = q.shape
    out = _logical(o6.contiguous(), hi).reshape(B, H, N, D)  # a view: o6 is q-ordered in memory
    lse = _logical(lse5[..., None], hi)[..., 0].reshape(B, H, N).contiguous()
    return out, lse, aux


def lse_backward(do, q, k, v, out, lse, aux, views, frames, kernel, scale):
    """Gradients of q, k, v (q's layout) from each part's backward with the merged out and lse."""
    fn = KERNEL_FNS[kernel]
    grads = [[], [], []]
    for part, extra in zip(PARTS, aux, strict=True):
        qp, kp, vp = [batches(x, part, views, frames) for x in (q, k, v)]
        op, dop = [_like(batches(x, part, views, frames), qp) for x in (out, do)]
        lp = _lse_batches(lse, part, views, frames)
        for g, dx in zip(grads, fn.bwd(dop, qp, kp, vp, op, lp, extra, scale), strict=True):
            g.append(grid(dx, part, views, frames))
    hi = _heads_inner(q)
    res = []
    for x, g in zip((q, k, v), grads, strict=True):
        g6 = _pointwise(combine, q)(*[_physical(p, hi) for p in g])
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
        # every pair of U lies in view or time and the pairs in both are the frame's, so
        # view + time - frame sums each pair's contribution exactly once (pair by pair, for dq,
        # dk and dv alike).
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


def resolve_kernel(q: Tensor, kernel: str = "auto") -> str:
    if kernel not in KERNELS:
        raise ValueError(f"view_time_attention: kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        kernel = fused_kernel(q) or "math"
    return kernel


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
