"""View-OR-time attention as two disjoint dense attentions merged by log-sum-exp (nn/lse_attention.py)
against dense SDPA with the boolean mask: forward and backward, several layouts, both CPU kernels."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fourdgen.nn.attention_kernels import windows
from fourdgen.nn.fused_attention import grid_attention
from fourdgen.nn.grid_layout import GridLayout
from fourdgen.nn.lse_attention import (
    ViewTimeLSE,
    cycled,
    fold,
    frame_batches,
    merge,
    view_batches,
    view_grid,
    view_time_attention,
)
from fourdgen.nn.view_time_mask import ViewTimeMask

VT = ("same_view", "same_time")
LAYOUTS = [
    GridLayout(2, 3, 1, 5),  # 5-token frames
    GridLayout(3, 2, 2, 3),
    GridLayout(4, 3, 1, 7),  # 7-token frames: a multiple of nothing
    GridLayout(3, 4, 1, 2, target_frames=2),  # condition frames: their own instants
]
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-4)}


def qkv(layout, B=2, H=3, D=8, dtype=torch.float64, heads_inner=False, seed=0):
    """Leaf tensors ``[B, H, N, D]``; ``heads_inner``: stored ``[B, N, H, D]`` (as the DiT gives them)."""
    g = torch.Generator().manual_seed(seed)
    N = layout.num_tokens
    shape = (B, N, H, D) if heads_inner else (B, H, N, D)
    out = []
    for _ in range(3):
        x = torch.randn(*shape, generator=g, dtype=dtype)
        out.append((x.transpose(1, 2) if heads_inner else x).requires_grad_())
    return out


def dense_reference(q, k, v, layout, grad):
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ViewTimeMask(VT).dense(layout))
    return ref, torch.autograd.grad(ref, (q, k, v), grad)


@pytest.mark.parametrize("kernel", ["math", "cpu_flash"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads_inner", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_matches_dense_masked_sdpa(layout, heads_inner, dtype, kernel):
    q, k, v = qkv(layout, dtype=dtype, heads_inner=heads_inner)
    grad = torch.randn(q.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    ref, ref_grads = dense_reference(q, k, v, layout, grad)
    out = view_time_attention(q, k, v, layout, kernel)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    grads = torch.autograd.grad(out, (q, k, v), grad)
    for name, a, b in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, n=name: f"d{n}: {m}")
    # Same memory layout in and out (no hidden transposes for the next layer).
    assert out.stride() == q.stride() and all(
        g.stride() == x.stride() for g, x in zip(grads, (q, k, v), strict=True)
    )


@pytest.mark.parametrize("layout", [GridLayout(1, 4, 1, 3), GridLayout(3, 1, 2, 2)], ids=str)
def test_one_view_or_one_frame_is_full_attention(layout):
    """V == 1 or F == 1: the union is every token (the frame would fill view or time)."""
    q, k, v = qkv(layout)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ViewTimeMask(VT).dense(layout))
    assert ViewTimeMask(VT).dense(layout).all()
    torch.testing.assert_close(view_time_attention(q, k, v, layout), ref)


@pytest.mark.parametrize("kernel", ["math", "cpu_flash"])
def test_gradcheck(kernel):
    layout = GridLayout(2, 2, 1, 3)
    q, k, v = qkv(layout, B=1, H=2, D=4)
    fn = lambda q, k, v: ViewTimeLSE.apply(q, k, v, 2, 2, kernel, 0.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_merge_is_stable_for_large_logits():
    """Logits of several hundred (exp overflows in fp32) and a frame holding nearly all the mass."""
    layout = GridLayout(3, 3, 1, 4)
    q, k, v = qkv(layout, dtype=torch.float32)
    q = (q.detach() * 40).requires_grad_()
    grad = torch.randn_like(q)
    ref, ref_grads = dense_reference(q, k, v, layout, grad)
    out = view_time_attention(q, k, v, layout, "cpu_flash")
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)  # scores ~ 40^2: gradients are large
    # The merge by itself: equal masses -> the mean of the outputs, log-sum-exp + log 2, no overflow.
    o1, o2 = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    lse = torch.full((2, 5), 300.0)
    out, L = merge(o1, o2, lse, lse)
    torch.testing.assert_close(out, (o1 + o2) / 2)
    torch.testing.assert_close(L, lse + torch.log(torch.tensor(2.0)))
    out, L = merge(o1, o2, lse, lse - 1e4)  # the others' mass underflows: the view's output
    torch.testing.assert_close(out, o1)


@pytest.mark.parametrize("heads_inner", [False, True])
def test_view_batches_and_grid_are_inverse(heads_inner):
    layout = GridLayout(3, 4, 1, 2)
    x = qkv(layout, B=2, H=3, D=5, heads_inner=heads_inner)[0].detach()
    y = view_batches(x, 3)
    g = view_grid(y, 3, 4)  # [B, H, V, F, S, D]
    torch.testing.assert_close(g.reshape(x.shape), x, rtol=0, atol=0)
    xs = x.unflatten(2, (3, 4, 2))  # [B, H, V, F, S, D]
    assert torch.equal(y[1 * 3 + 2], xs[1, :, 2].flatten(1, 2))  # view v holds its frames


def test_windows_hold_the_other_views_and_fold_is_their_adjoint():
    """Window v of a frame holds views v + 1 .. v + V - 1 (mod V) of that frame, as a view of the
    cycled copy (no copy); frame_batches reads the queries in place; fold sums window gradients
    back onto their views (the adjoint)."""
    V, Fr, S, H, D = 4, 3, 2, 3, 5
    x = torch.randn(2, H, V * Fr * S, D, dtype=torch.float64)
    xs = x.unflatten(2, (V, Fr, S))  # [B, H, V, F, S, D]
    qf = frame_batches(x, V, Fr)  # [B, F, V, H, S, D]
    assert qf.data_ptr() == x.data_ptr() and torch.equal(qf[1, 2, 3], xs[1, :, 3, 2])
    for src in (x, x.transpose(1, 2).contiguous().transpose(1, 2)):  # heads outer, heads inner
        xc = cycled(src, V, Fr)  # [B, F, 2V-2, S, H, D]
        assert xc.shape == (2, Fr, 2 * V - 2, S, H, D)
        inner = src.stride(1) < src.stride(2)
        assert xc.is_contiguous() if inner else xc.permute(0, 4, 1, 2, 3, 5).is_contiguous()
        w = windows(xc[1, 2], V)  # [V, H, (V-1) S, D]
        assert w.data_ptr() == xc[1, 2, 0].data_ptr()  # a view: no per-window copy
        for v in range(V):
            others = [xs[1, :, (v + 1 + j) % V, 2] for j in range(V - 1)]  # [H, S, D] each
            assert torch.equal(w[v], torch.cat(others, 1))
    frame = xs[1, :, :, 2].transpose(0, 2).transpose(0, 1).clone().requires_grad_()  # [V, S, H, D]
    g = torch.randn(V, H, (V - 1) * S, D, dtype=torch.float64)
    (windows(torch.cat([frame[1:], frame[:-1]]), V) * g).sum().backward()
    torch.testing.assert_close(fold(g, V), frame.grad.transpose(1, 2))


def test_expanded_output_gradient():
    """``out.sum().backward()`` hands the backward a zero-stride gradient (benchmarks do this)."""
    layout = GridLayout(3, 2, 2, 3)
    q, k, v = qkv(layout, dtype=torch.float32, heads_inner=True)
    _, ref_grads = dense_reference(q, k, v, layout, torch.ones_like(q))
    view_time_attention(q, k, v, layout).sum().backward()
    for x, b in zip((q, k, v), ref_grads, strict=True):
        torch.testing.assert_close(x.grad, b, **TOL[torch.float32])


def test_activation_checkpointing():
    layout = GridLayout(3, 2, 2, 3)
    q, k, v = qkv(layout, dtype=torch.float32, heads_inner=True)
    grad = torch.randn_like(q)
    ref, ref_grads = dense_reference(q, k, v, layout, grad)
    out = checkpoint(view_time_attention, q, k, v, layout, use_reentrant=False)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), ref_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """Dynamo traces the autograd.Function (forward and backward) without a graph break, also
    inside non-reentrant activation checkpointing (as a compiled, checkpointed DiT block)."""
    layout = GridLayout(3, 2, 2, 3)
    q, k, v = qkv(layout, dtype=torch.float32, heads_inner=True)
    grad = torch.randn_like(q)
    ref, ref_grads = dense_reference(q, k, v, layout, grad)

    def block(q, k, v):
        return checkpoint(view_time_attention, q * 1.0, k, v, layout, use_reentrant=False)

    out = torch.compile(block, fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), ref_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# --- the library path: grid_attention and the couplings -----------------------------------------


def test_is_view_or_time():
    plain, cond = GridLayout(2, 4, 1, 1), GridLayout(2, 4, 1, 1, target_frames=2)
    assert ViewTimeMask(VT).is_view_or_time(plain) and ViewTimeMask(VT[::-1]).is_view_or_time(cond)
    assert ViewTimeMask((*VT, "same_frame")).is_view_or_time(cond)
    assert ViewTimeMask((*VT, "cross_half")).is_view_or_time(plain)  # no condition frames: no-op term
    assert not ViewTimeMask((*VT, "cross_half")).is_view_or_time(cond)
    assert not ViewTimeMask(("same_time",)).is_view_or_time(plain)


def test_grid_attention_lse_backend():
    layout = GridLayout(3, 2, 1, 5)
    q, k, v = qkv(layout, dtype=torch.float32)
    ref = grid_attention(q, k, v, layout, ViewTimeMask(VT), "dense")
    torch.testing.assert_close(grid_attention(q, k, v, layout, ViewTimeMask(VT), "lse"), ref)
    cond = GridLayout(3, 4, 1, 2, target_frames=2)
    q, k, v = qkv(cond, dtype=torch.float32)
    with pytest.raises(ValueError, match="'lse' computes same_view | same_time only"):
        grid_attention(q, k, v, cond, ViewTimeMask((*VT, "cross_half")), "lse")


def test_couplings_check_the_backend():
    from fourdgen.nn.grid_coupling import ProjectionGrid, ReferenceGrid

    assert ReferenceGrid(backend="lse").state.backend == "lse"
    assert ProjectionGrid.backend_problem(["same_view", "same_time"], "lse") is None
    with pytest.raises(ValueError, match=r"ProjectionGrid.backend: 'lse' computes exactly"):
        ProjectionGrid(backend="lse")  # default mask has cross_half
    with pytest.raises(ValueError, match="ReferenceGrid.backend: expected one of"):
        ReferenceGrid(backend="cudnn")


def test_grid_dit_lse_equals_dense_forward_and_backward():
    """The tiny DiT with ReferenceGrid: backend lse equals dense (output and the self-attention
    weights' gradients), also under gradient checkpointing."""
    from fourdgen.backbones.wan import build_transformer
    from fourdgen.nn.grid_coupling import GridInputs, ReferenceGrid

    torch.manual_seed(0)
    V, Fr, h, w = 3, 2, 4, 6  # 2 x 3 tokens a frame
    stock = build_transformer(preset="tiny", seed=0)
    x = torch.randn(2, 16, V * Fr, h, w)
    text = torch.randn(2, 8, 32)
    t = torch.tensor([700.0, 200.0])
    results = {}
    for backend in ("dense", "lse"):
        c = ReferenceGrid(backend=backend)
        dit = c.install(copy.deepcopy(stock))
        dit.enable_gradient_checkpointing()
        inp = GridInputs(x0=x, views=V)
        inp.reference = torch.zeros_like(x)
        out = c.predict(dit, x, inp, t, text, None)
        (out**2).mean().backward()
        grads = {n: p.grad.clone() for n, p in dit.named_parameters() if "attn1." in n and p.grad is not None}
        results[backend] = out.detach(), grads
    (out_d, g_d), (out_l, g_l) = results["dense"], results["lse"]
    torch.testing.assert_close(out_l, out_d, atol=1e-5, rtol=1e-4)
    assert g_d.keys() == g_l.keys() and g_d
    for n in g_d:
        torch.testing.assert_close(g_l[n], g_d[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
