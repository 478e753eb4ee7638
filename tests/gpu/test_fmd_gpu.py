"""Flow-matching distillation on CUDA: gsplat renders, the bf16 grid prior, gradients into the Gaussians."""

from __future__ import annotations

import pytest
import torch

from fourdgen.backbones.text import HashTextEncoder
from fourdgen.stages.grid_prior import GridPrior
from tests.test_grid_prior import _fitter_with, _save_grid_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("gsplat_built_once"),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fmd_step_on_cuda_with_gsplat_and_a_bf16_prior(tmp_path, dtype):
    _save_grid_checkpoint(tmp_path / "grid.ckpt")
    prior = GridPrior(
        checkpoint=str(tmp_path / "grid.ckpt"), text_encoder=HashTextEncoder(32, 8), dtype=dtype
    )
    model, fmd = _fitter_with(prior, tmp_path)
    model.to("cuda")
    render = model._render_novel_view(None)
    assert render.rgb.is_cuda
    loss = fmd(render)
    loss.backward()
    assert loss.is_cuda and torch.isfinite(loss)
    assert next(prior.model.transformer.parameters()).dtype == getattr(torch, dtype)
    assert model.splats["sh0"].grad.abs().sum() > 0
    assert not any(p.grad is not None for p in prior.model.parameters())
    # the same step with the prior on "another" device string resolves to the same GPU and agrees
    fmd.prior_device, fmd._ready = "cuda:0", False
    again = fmd(model._render_novel_view(None))
    torch.testing.assert_close(again, loss.detach(), rtol=1e-4, atol=1e-6)
