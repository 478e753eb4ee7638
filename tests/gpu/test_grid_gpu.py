"""Fused view-time attention on CUDA: FlexAttention against the dense reference (forward and
backward, float32 and bf16), and grid models training with it under bf16-mixed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fourdgen.backbones.wan import build_transformer
from fourdgen.nn.fused_attention import compiled_flex
from fourdgen.nn.grid_coupling import GridInputs, ProjectionGrid, ReferenceGrid
from fourdgen.nn.grid_layout import GridLayout
from fourdgen.nn.view_time_mask import ViewTimeMask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "layout,terms",
    [
        (GridLayout(4, 3, 10, 13), ("same_view", "same_time")),  # 130-token frames: partial blocks
        (GridLayout(3, 6, 8, 16, target_frames=3), ("same_view", "same_time", "cross_half")),  # aligned
    ],
)
def test_flex_matches_dense_reference(layout, terms, dtype):
    mask = ViewTimeMask(terms)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, layout.num_tokens, 64, device="cuda", generator=g).to(dtype).requires_grad_()
        for _ in range(3)
    )
    dense = mask.dense(layout, "cuda")
    # Reference in float32 whatever the dtype under test.
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=dense)
    out = compiled_flex()(q, k, v, block_mask=mask.block_mask(layout, "cuda"))
    tol = {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out.float(), ref, **tol)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), grad)
    grads = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    gtol = {"atol": 1e-4, "rtol": 1e-3} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.float(), b, **gtol)


@pytest.mark.parametrize("kind", ["reference", "projection"])
def test_grid_dit_flex_equals_dense_and_trains_in_bf16(kind):
    """The tiny DiT with the grid coupling: flex and dense backends agree; a bf16-mixed step with
    gradient checkpointing gives finite gradients on the trainable tensors only."""
    torch.manual_seed(0)
    V, Fr, h, w = 3, 3, 8, 10  # 3 views x 3 latent frames x 4x5 tokens (20-token frames)
    stock = build_transformer(preset="tiny", seed=0).cuda()
    make = (
        (lambda b: ReferenceGrid(backend=b)) if kind == "reference" else (lambda b: ProjectionGrid(backend=b))
    )
    x = torch.randn(2, 16, V * Fr, h, w, device="cuda")
    text = torch.randn(2, 8, 32, device="cuda")
    inp = GridInputs(x0=x, views=V)
    if kind == "reference":
        inp.reference = torch.randn_like(x) * (torch.rand(1, 1, V * Fr, 1, 1, device="cuda") < 0.4)
    else:
        inp.cond, inp.camera = torch.randn_like(x), torch.randn(2, V, 12, device="cuda")
    t = torch.tensor([700.0, 200.0], device="cuda")
    outs = {}
    for backend in ("dense", "flex"):
        c = make(backend)
        dit = c.install(copy.deepcopy(stock))
        if kind == "projection":
            torch.manual_seed(1)  # the same weights for both backends
            for blk in dit.blocks:  # leave zero-init so the fused branch matters
                torch.nn.init.normal_(blk.fused_proj.weight, std=0.05)
        with torch.no_grad():
            outs[backend] = c.predict(dit, x, inp, t, text, None)
    torch.testing.assert_close(outs["flex"], outs["dense"], atol=1e-4, rtol=1e-3)

    c = make("flex")
    dit = c.install(copy.deepcopy(stock)).to(torch.bfloat16)
    for name, p in dit.named_parameters():
        p.requires_grad_("attn1." in name or any(k in name for k in c.trainable))
        if p.requires_grad:
            p.data = p.data.float()
    dit.enable_gradient_checkpointing()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = c.predict(dit, x, inp, t, text, None)
    loss = (out.float() ** 2).mean()
    loss.backward()
    grads = [p.grad for p in dit.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in dit.parameters() if not p.requires_grad)
