"""View-OR-time attention through the log-sum-exp merge on CUDA (fourdgen/nn/lse_attention.py): the
kernels' signatures, cuDNN / flash against the dense reference (forward and backward, bf16 and
fp16; fp32 through the math kernel), a paper-size grid, backend selection, torch.compile, and the
tiny grid DiT training with it under bf16 autocast."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fourdgen.nn.fused_attention as fa
from fourdgen.backbones.wan import build_transformer
from fourdgen.nn import attention_kernels as ak
from fourdgen.nn import lse_attention as la
from fourdgen.nn.attention_kernels import fused_kernel
from fourdgen.nn.fused_attention import grid_attention
from fourdgen.nn.grid_coupling import GridInputs, ReferenceGrid
from fourdgen.nn.grid_layout import GridLayout
from fourdgen.nn.lse_attention import view_time_attention
from fourdgen.nn.view_time_mask import ViewTimeMask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
VT = ("same_view", "same_time")


def _names(op) -> list[str]:
    return [a.name for a in op.default._schema.arguments]


def test_kernel_signatures():
    """The positional arguments lse_attention.py passes (print: -s shows each schema)."""
    aten = torch.ops.aten
    for op in (
        aten._scaled_dot_product_cudnn_attention,
        aten._scaled_dot_product_cudnn_attention_backward,
        aten._scaled_dot_product_flash_attention,
        aten._scaled_dot_product_flash_attention_backward,
    ):
        print(torch.__version__, op.default._schema)
    assert _names(aten._scaled_dot_product_cudnn_attention)[:8] == [
        "query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal",
        "return_debug_mask",
    ]  # fmt: skip
    assert _names(aten._scaled_dot_product_cudnn_attention_backward)[:15] == [
        "grad_out", "query", "key", "value", "out", "logsumexp", "philox_seed", "philox_offset",
        "attn_bias", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal",
    ]  # fmt: skip
    assert _names(aten._scaled_dot_product_flash_attention)[:6] == [
        "query", "key", "value", "dropout_p", "is_causal", "return_debug_mask",
    ]  # fmt: skip
    assert _names(aten._scaled_dot_product_flash_attention_backward)[:14] == [
        "grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q",
        "max_k", "dropout_p", "is_causal", "philox_seed", "philox_offset",
    ]  # fmt: skip
    q = torch.randn(2, 3, 40, 64, device="cuda", dtype=torch.bfloat16)
    r = aten._scaled_dot_product_cudnn_attention(q, q, q, None, True, 0.0, False, False)
    print("cuDNN logsumexp", tuple(r[1].shape), r[1].dtype, "flash", end=" ")
    r2 = aten._scaled_dot_product_flash_attention(q, q, q, 0.0, False, False)
    print(tuple(r2[1].shape), r2[1].dtype)
    assert r[1].numel() == r2[1].numel() == 2 * 3 * 40 and r[1].dtype == r2[1].dtype == torch.float32
    torch.testing.assert_close(r[1].reshape(2, 3, 40), r2[1], atol=1e-3, rtol=1e-4)  # natural log, same


def _qkv(layout, dtype, heads_inner, B=2, H=4, D=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    N = layout.num_tokens
    shape = (B, N, H, D) if heads_inner else (B, H, N, D)
    xs = [torch.randn(*shape, device="cuda", generator=g).to(dtype) for _ in range(3)]
    return [(x.transpose(1, 2) if heads_inner else x).requires_grad_() for x in xs]


def _reference(q, k, v, layout, grad):
    """Dense masked SDPA in float32 whatever the dtype under test."""
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=ViewTimeMask(VT).dense(layout, "cuda"))
    return ref, torch.autograd.grad(ref, (qf, kf, vf), grad)


@pytest.mark.parametrize("heads_inner", [True, False])
@pytest.mark.parametrize(
    "kernel,dtype",
    [("cudnn", torch.bfloat16), ("flash", torch.bfloat16), ("cudnn", torch.float16), ("math", torch.float32)],
)
@pytest.mark.parametrize(
    "layout",
    [GridLayout(4, 3, 10, 13), GridLayout(3, 6, 8, 16, target_frames=3), GridLayout(2, 5, 1, 7)],
    ids=str,
)
def test_matches_dense_reference(layout, kernel, dtype, heads_inner):
    q, k, v = _qkv(layout, dtype, heads_inner)
    grad = torch.randn(q.shape, device="cuda")
    ref, ref_grads = _reference(q, k, v, layout, grad)
    out = view_time_attention(q, k, v, layout, kernel)
    grads = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    errs = [(out.float() - ref).abs().max().item()] + [
        (a.float() - b).abs().max().item() for a, b in zip(grads, ref_grads, strict=True)
    ]
    print(f"{layout} {kernel} {dtype} heads_inner={heads_inner}: out, dq, dk, dv max err {errs}")
    tol = {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    gtol = {"atol": 1e-4, "rtol": 1e-3} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    torch.testing.assert_close(out.float(), ref, **tol)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.float(), b, **gtol)
    assert out.stride() == q.stride()
    assert [g.stride() for g in grads] == [x.stride() for x in (q, k, v)]


def _chunked_reference(q, k, v, layout, grad, frames_per_chunk=2):
    """Dense masked SDPA in float32, a few query frames at a time (the full N x N mask would not
    fit): output and gradients, accumulated over the query chunks."""
    n = layout.frame_tokens
    rows = ViewTimeMask(VT).frames(layout, "cuda").repeat_interleave(n, 1)  # [V F, N]
    qf, kf, vf = (t.detach().float() for t in (q, k, v))
    kf.requires_grad_(), vf.requires_grad_()
    out, dq = torch.empty_like(qf), torch.empty_like(qf)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    for f0 in range(0, layout.num_frames, frames_per_chunk):
        sl = slice(f0 * n, min(layout.num_frames, f0 + frames_per_chunk) * n)
        qc = qf[:, :, sl].clone().requires_grad_()
        mask = rows[f0 : f0 + frames_per_chunk].repeat_interleave(n, 0)
        oc = F.scaled_dot_product_attention(qc, kf, vf, attn_mask=mask)
        gq, gk, gv = torch.autograd.grad(oc, (qc, kf, vf), grad[:, :, sl])
        out[:, :, sl], dq[:, :, sl] = oc.detach(), gq
        dk += gk
        dv += gv
    return out, (dq, dk, dv)


def test_paper_size_grid_matches_dense():
    """8 views x 8 latent frames x 1560 tokens (Wan-14B at 480p), 2 of the 40 heads x 128, bf16,
    against dense masked SDPA in float32 (computed in query chunks)."""
    layout = GridLayout(8, 8, 30, 52)
    q, k, v = _qkv(layout, torch.bfloat16, heads_inner=True, B=1, H=2, D=128)
    grad = torch.randn(q.shape, device="cuda")
    ref, ref_grads = _chunked_reference(q, k, v, layout, grad)
    out = view_time_attention(q, k, v, layout)
    grads = torch.autograd.grad(out, (q, k, v), grad.bfloat16())
    errs = [(out.float() - ref).abs().max().item()] + [
        (a.float() - b).abs().max().item() for a, b in zip(grads, ref_grads, strict=True)
    ]
    print(f"paper grid, bf16 {fused_kernel(q)} vs fp32 dense: out, dq, dk, dv max err {errs}")
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=5e-2)


def test_auto_picks_lse_for_view_or_time_only(monkeypatch):
    calls = []
    real = fa.view_time_attention
    monkeypatch.setattr(fa, "view_time_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    layout = GridLayout(3, 4, 4, 8, target_frames=2)
    q, k, v = (t.detach() for t in _qkv(layout, torch.bfloat16, heads_inner=True))
    vt, full4d = ViewTimeMask(VT), ViewTimeMask((*VT, "cross_half"))
    out = grid_attention(q, k, v, layout, vt, "auto")
    assert len(calls) == 1
    torch.testing.assert_close(out, grid_attention(q, k, v, layout, vt, "flex"), atol=2e-2, rtol=2e-2)
    grid_attention(q, k, v, layout, full4d, "auto")  # cross-half term: flex
    grid_attention(q.float(), k.float(), v.float(), layout, vt, "auto")  # float32: no fused kernel, flex
    assert len(calls) == 1


def _frame_call(dtype=torch.bfloat16):
    """One frame's others call as the library makes it: q strided in place, cycled k and v."""
    V, Fr = 4, 3
    layout = GridLayout(V, Fr, 4, 6)
    q, k, v = (t.detach() for t in _qkv(layout, dtype, heads_inner=True))
    return la.frame_batches(q, V, Fr)[0, 1], la.cycled(k, V, Fr)[0, 1], la.cycled(v, V, Fr)[0, 1], V


def test_cudnn_custom_ops_pass_opcheck():
    """Schema, fake (meta) functions and strides, and AOT dispatch of both cuDNN ops, plain and
    windowed."""
    q, kc, vc, V = _frame_call()
    scale = q.shape[-1] ** -0.5
    for k, v, views in ((q.contiguous(), q.contiguous(), 0), (kc, vc, V)):
        out, lse = ak.cudnn_attention(q, k, v, scale, views)
        torch.library.opcheck(ak.cudnn_attention, (q, k, v, scale, views))
        do = torch.randn_like(out)
        torch.library.opcheck(ak.cudnn_attention_backward, (do, q, k, v, out, lse, scale, views))


def test_cudnn_backward_with_other_strides_of_out_and_grad():
    """cuDNN's backward plan cache is keyed by q/k/v only: after a call whose out / dO have q's
    strides, a call with the same q/k/v and other out / dO strides must still be right (the op
    copies them into q's layout)."""
    q, kc, vc, V = _frame_call()
    scale = q.shape[-1] ** -0.5
    out, lse = ak.cudnn_attention(q, kc, vc, scale, V)
    do = torch.randn_like(out)
    ref = ak._math_bwd(do, q, kc, vc, out, lse, (), scale, V)
    for o, d in (
        (out, do),
        (out.contiguous(), do.contiguous()),
        (out, do.transpose(-1, -2).contiguous().transpose(-1, -2)),
    ):
        for a, b in zip(ak.cudnn_attention_backward(d, q, kc, vc, o, lse, scale, V), ref, strict=True):
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_torch_compile_fullgraph_equals_eager():
    layout = GridLayout(4, 3, 10, 13)
    q, k, v = _qkv(layout, torch.bfloat16, heads_inner=True)
    grad = torch.randn_like(q)
    out = view_time_attention(q, k, v, layout)
    grads = torch.autograd.grad(out, (q, k, v), grad)

    def block(q, k, v):  # as a compiled DiT block under activation checkpointing
        return checkpoint(view_time_attention, q * 1.0, k, v, layout, use_reentrant=False)

    out_c = torch.compile(block, fullgraph=True)(q, k, v)
    grads_c = torch.autograd.grad(out_c, (q, k, v), grad)
    torch.testing.assert_close(out_c, out, atol=1e-2, rtol=1e-2)
    for a, b in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_grid_dit_lse_equals_dense_and_trains_in_bf16():
    """The tiny DiT with ReferenceGrid: lse equals dense in float32 (math kernel on CUDA), and a
    bf16 step under autocast with gradient checkpointing (cuDNN kernel) gives finite gradients
    close to the dense backend's."""
    torch.manual_seed(0)
    V, Fr, h, w = 3, 3, 8, 10  # 3 views x 3 latent frames x 4x5 tokens (20-token frames)
    stock = build_transformer(preset="tiny", seed=0).cuda()
    x = torch.randn(2, 16, V * Fr, h, w, device="cuda")
    text = torch.randn(2, 8, 32, device="cuda")
    inp = GridInputs(x0=x, views=V)
    inp.reference = torch.randn_like(x) * (torch.rand(1, 1, V * Fr, 1, 1, device="cuda") < 0.4)
    t = torch.tensor([700.0, 200.0], device="cuda")
    outs, grads = {}, {}
    for backend in ("dense", "lse"):
        c = ReferenceGrid(backend=backend)
        dit = c.install(copy.deepcopy(stock))
        with torch.no_grad():
            outs[backend] = c.predict(dit, x, inp, t, text, None)
        dit = dit.to(torch.bfloat16)
        for name, p in dit.named_parameters():
            p.requires_grad_("attn1." in name)
            if p.requires_grad:
                p.data = p.data.float()
        dit.enable_gradient_checkpointing()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = c.predict(dit, x, inp, t, text, None)
        (out.float() ** 2).mean().backward()
        grads[backend] = {n: p.grad.float() for n, p in dit.named_parameters() if p.requires_grad}
        assert all(torch.isfinite(g).all() for g in grads[backend].values())
    torch.testing.assert_close(outs["lse"], outs["dense"], atol=1e-4, rtol=1e-3)
    for n, g in grads["dense"].items():
        rel = (grads["lse"][n] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 5e-2, (n, rel.item())
