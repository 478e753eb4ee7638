"""The 4DGS fitter's compiled CUDA step: the CUDA-graphed regularisers and the compiled
deformation equal eager (values and gradients, across optimizer steps), and a compiled fit runs
through Lightning with host copies of the step count and moving index that stay right."""

from __future__ import annotations

import pytest
import torch

from fourdgen.gaussians.deformation import DeformationField
from fourdgen.stages.common import compile_dynamic, compile_graphed
from tests.test_fit import _budget, _dm, _fitter, _trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_graphed_regularisers_and_compiled_field_equal_eager_across_steps():
    torch.manual_seed(0)
    field = DeformationField(features=8, resolution=(8, 8, 8, 5), multires=(1, 2), width=16).cuda()
    twin = DeformationField(features=8, resolution=(8, 8, 8, 5), multires=(1, 2), width=16).cuda()
    twin.load_state_dict(field.state_dict())
    for m in (field, twin):  # a non-zero start: the zero-initialised heads would hide the field
        for p in m.parameters():
            p.data.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).cuda())
    reg, fwd = compile_graphed(field.regularization), compile_dynamic(field.forward)
    opt_a = torch.optim.Adam(field.parameters(), lr=1e-2, fused=True)
    opt_b = torch.optim.Adam(twin.parameters(), lr=1e-2, fused=True)
    for step, n in enumerate((300, 300, 257, 300)):  # in-place updates and a new count between calls
        means = torch.rand(n, 3, device="cuda") * 2 - 1
        t = torch.tensor(0.1 + 0.2 * step, device="cuda")
        got, ref = reg(), twin.regularization()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)
        loss_a, loss_b = sum(got.values()), sum(ref.values())
        for da, db in zip(vars(fwd(means, t)).values(), vars(twin(means, t)).values(), strict=True):
            loss_a, loss_b = loss_a + da.square().sum(), loss_b + db.square().sum()
        opt_a.zero_grad(), opt_b.zero_grad()
        loss_a.backward(), loss_b.backward()
        for (name, a), b in zip(field.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-6, msg=f"step {step}: {name}")
        opt_a.step(), opt_b.step()


def test_compiled_fit_runs_and_keeps_its_host_copies(tmp_path):
    model = _fitter(12, compile=True, temporal_opacity=True, densify=_budget(4))
    dm = _dm(tmp_path, init_points=300, init_frames="all", split_static=True)
    trainer = _trainer(tmp_path, 12, accelerator="gpu", devices=1)
    trainer.fit(model, dm)
    assert model.is_fine and int(model.trained_steps) == 12 and model._steps == 12
    assert len(model.splats["means"]) > 300  # densified: the moving index was rebuilt
    fresh = (model.splats["static"] <= 0.5).nonzero()[:, 0]
    assert torch.equal(model._moving_index(), fresh)
    assert all(torch.isfinite(p).all() for p in model.parameters())
