"""The dense attention kernels that :mod:`.lse_attention` merges, behind one interface.

Each kernel takes ``q, k, v [b, H, L, D]`` and returns the output and its log-sum-exp; its backward
takes ANY output and log-sum-exp (the merged ones, ring-attention style) and returns the gradients
of q, k and v. With ``views > 0``, k and v are one frame's cycled keys (:func:`windows`).

Kernels: ``cudnn`` / ``flash`` (CUDA, fp16/bf16), ``cpu_flash`` (CPU) and ``math`` (matmul softmax
with a hand-written backward: anywhere, ``O(L^2)`` memory; the reference). The aten entry points are
called directly because SDPA's public function returns no log-sum-exp and its backward cannot be
given another output's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

aten = torch.ops.aten
KERNELS = ("auto", "cudnn", "flash", "cpu_flash", "math")


class Kernel(NamedTuple):
    """``fwd(q, k, v, scale, views) -> (out, lse [b, H, L], aux)``; ``bwd(do, q, k, v, out, lse, aux,
    scale, views) -> (dq, dk, dv)`` where ``out, lse`` may be any (here: the merged) output and
    log-sum-exp. ``views > 0``: k and v are one frame's cycled keys ``[2V - 2, S, H, D]`` and the
    kernel attends to their :func:`windows` (dk, dv are then the windows' gradients). ``aux``:
    kernel tensors the backward wants back (tuple)."""

    fwd: Callable
    bwd: Callable


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and softmaxes run in: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def windows(xc: Tensor, views: int) -> Tensor:
    """One frame's cycled keys ``xc [2V - 2, S, H, D]`` (:func:`~.lse_attention.cycled`) ->
    ``[V, H, (V - 1) S, D]``: for query view v the keys of views ``v + 1 .. v + V - 1`` mod V, as
    one overlapping strided view (``unfold``: a sliding window over the views; dynamo traces it,
    unlike ``as_strided``'s offset)."""
    w = xc.unfold(0, views - 1, 1)  # [V, S, H, D, V-1]
    return w.permute(0, 2, 4, 1, 3).flatten(2, 3)


def _keys(x: Tensor, views: int) -> Tensor:
    return windows(x, views) if views else x


def _math_fwd(q, k, v, scale, views=0):
    k, v = _keys(k, views), _keys(v, views)
    a = acc_dtype(q.dtype)
    s = torch.matmul(q.to(a), k.to(a).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse[..., None]), v.to(a))
    return out.to(q.dtype), lse, ()


def _math_bwd(do, q, k, v, out, lse, aux, scale, views=0):
    # Softmax gradient with the probabilities rebuilt from the (given) log-sum-exp:
    # P = exp(s - L), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q.
    k, v = _keys(k, views), _keys(v, views)
    a = acc_dtype(q.dtype)
    q_, k_, v_, do_ = q.to(a), k.to(a), v.to(a), do.to(a)
    p = torch.exp(torch.matmul(q_, k_.transpose(-1, -2)) * scale - lse.to(a)[..., None])
    dv = torch.matmul(p.transpose(-1, -2), do_)
    delta = (do_ * out.to(a)).sum(-1, keepdim=True)
    ds = p * (torch.matmul(do_, v_.transpose(-1, -2)) - delta) * scale
    dq, dk = torch.matmul(ds, k_), torch.matmul(ds.transpose(-1, -2), q_)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _cpu_flash_fwd(q, k, v, scale, views=0):
    k, v = _keys(k, views), _keys(v, views)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, lse, ()  # lse [b, H, L] (a transposed [b, L, H]); float64 for float64 inputs


def _cpu_flash_bwd(do, q, k, v, out, lse, aux, scale, views=0):
    k, v = _keys(k, views), _keys(v, views)
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, False, scale=scale
    )


# cuDNN runs as two custom ops rather than bare aten calls, for two reasons:
# - cuDNN caches its backward plan keyed by q/k/v sizes and strides only, but builds the plan with
#   out's and dO's strides too: a later call with the same q/k/v strides and different out/dO
#   strides silently reads them wrongly. The backward op enforces one rule at run time (out and dO
#   have q's strides), which a compiled graph could not: inductor may lay out intermediates
#   differently from eager, and a check traced on fake tensors would not see it.
# - ``needs_exact_strides``: inductor hands the ops tensors with exactly their traced strides, so
#   the outputs' real layouts (cuDNN follows q's layout) are the ones the fake functions declare.
_EXACT = (torch.Tag.needs_exact_strides,)


@torch.library.custom_op("fourdgen::cudnn_attention", mutates_args=(), tags=_EXACT)
def cudnn_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, views: int) -> tuple[Tensor, Tensor]:
    """cuDNN attention ``q [b, H, L, D]`` -> ``out`` (q's layout), ``lse [b, H, L]`` (float32)."""
    k, v = _keys(k, views), _keys(v, views)
    r = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    return r[0], r[1].reshape(q.shape[:3])  # logsumexp is [b, H, L, 1] from torch 2.9 on


@cudnn_attention.register_fake
def _(q, k, v, scale, views):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fourdgen::cudnn_attention_backward", mutates_args=(), tags=_EXACT)
def cudnn_attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, views: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`cudnn_attention` given any ``out`` and ``lse`` (the merged ones here)."""
    kw, vw = _keys(k, views), _keys(v, views)
    if out.stride() != q.stride() or do.stride() != q.stride():  # the plan-cache rule (above)
        q, out, do = [torch.empty_like(q).copy_(x) for x in (q, out, do)]
    L, Lk = q.shape[2], kw.shape[2]
    seed = torch.empty((), dtype=torch.int64, device=q.device)  # dropout off: never read
    return aten._scaled_dot_product_cudnn_attention_backward(
        do, q, kw, vw, out, lse.contiguous().unsqueeze(-1), seed, seed,
        None, None, None, L, Lk, 0.0, False, scale=scale,
    )[:3]  # fmt: skip


@cudnn_attention_backward.register_fake
def _(do, q, k, v, out, lse, scale, views):
    return tuple(torch.empty_like(x) for x in (q, _keys(k, views), _keys(v, views)))


def _cudnn_fwd(q, k, v, scale, views=0):
    return (*cudnn_attention(q, k, v, scale, views), ())


def _cudnn_bwd(do, q, k, v, out, lse, aux, scale, views=0):
    return cudnn_attention_backward(do, q, k, v, out, lse, scale, views)


def _flash_fwd(q, k, v, scale, views=0):
    # (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, rng_state/philox_seed, unused/offset, debug)
    k, v = _keys(k, views), _keys(v, views)
    r = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return r[0], r[1], (r[6], r[7])


def _flash_bwd(do, q, k, v, out, lse, aux, scale, views=0):
    k, v = _keys(k, views), _keys(v, views)
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


def resolve_kernel(q: Tensor, kernel: str = "auto") -> str:
    """``kernel`` checked against :data:`KERNELS`, with ``auto`` resolved by :func:`fused_kernel`."""
    if kernel not in KERNELS:
        raise ValueError(f"view_time_attention: kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        kernel = fused_kernel(q) or "math"
    return kernel
