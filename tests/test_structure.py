"""The stage-1 family and its adapters: one base, sibling stages, one place per adapter kind, and
checkpoints that say (and rebuild) which coupling and conditioning trained them."""

from __future__ import annotations

import torch

from fourdgen.components import build
from fourdgen.diffusion.conditioning import MaskedFrames
from fourdgen.diffusion.flow import euler_sample, euler_sample_known
from fourdgen.nn.adapters import FullFinetune, PeftLoRA
from fourdgen.nn.decoupled_lora import DecoupledLoRA, DecoupledLoRAControl
from fourdgen.nn.grid_coupling import BatchDepth, ProjectionGrid
from fourdgen.nn.wan_fusion import WidthFusion
from fourdgen.stages.dit import DiTFinetune
from fourdgen.stages.grid import GridDiffusion
from fourdgen.stages.video import VideoDiffusion


def test_pointmap_and_grid_stages_are_siblings():
    assert issubclass(VideoDiffusion, DiTFinetune) and issubclass(GridDiffusion, DiTFinetune)
    assert not issubclass(GridDiffusion, VideoDiffusion) and not issubclass(VideoDiffusion, GridDiffusion)
    assert not hasattr(GridDiffusion(lpips_net=None), "conditioning")


def test_each_coupling_gets_one_adapter_kind():
    assert isinstance(VideoDiffusion().adapter, PeftLoRA)  # 4DNeX: peft LoRA
    assert isinstance(VideoDiffusion(lora_rank=0).adapter, FullFinetune)
    one4d = VideoDiffusion(coupling=DecoupledLoRAControl(rank=4, num_links=2), conditioning=MaskedFrames())
    assert isinstance(one4d.adapter, DecoupledLoRA)  # One4D brings its own
    grid = GridDiffusion(train_modules=["attn1."], lpips_net=None)
    assert isinstance(grid.adapter, FullFinetune) and grid.adapter.modules == ("attn1.",)


def test_dlc_export_loads_back_through_init_lora(tmp_path):
    """Adding, exporting and loading a decoupled LoRA all go through its adapter: the stage's
    ``init_lora`` takes a DLC export like a LoRA one (it was refused before)."""
    kw = dict(coupling=DecoupledLoRAControl(rank=4, num_links=2), conditioning=MaskedFrames(seed=0))
    model = VideoDiffusion(**kw)
    model.configure_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.transformer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    assert model.export_adapter(tmp_path / "dlc")
    loaded = VideoDiffusion(**kw, init_lora=str(tmp_path / "dlc"))
    loaded.configure_model()
    want = {n: p for n, p in model.transformer.named_parameters() if p.requires_grad}
    got = {n: p for n, p in loaded.transformer.named_parameters() if p.requires_grad}
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)
    assert not VideoDiffusion(lora_rank=0).export_adapter(tmp_path / "full")  # checkpoint holds it


def test_hyperparameters_record_and_rebuild_the_components():
    model = VideoDiffusion(
        coupling=DecoupledLoRAControl(rank=4, num_links=3), conditioning=MaskedFrames(seed=7)
    )
    h = dict(model.hparams)
    assert h["coupling"] == {
        "class_path": "fourdgen.nn.decoupled_lora.DecoupledLoRAControl",
        "init_args": {"rank": 4, "alpha": None, "num_links": 3, "link_layers": None, "targets": "blocks"},
    }
    assert h["conditioning"]["init_args"]["seed"] == 7
    rebuilt = VideoDiffusion(**h)  # what load_from_checkpoint does
    assert isinstance(rebuilt.coupling, DecoupledLoRAControl) and rebuilt.coupling.adapter.num_links == 3
    assert isinstance(rebuilt.conditioning, MaskedFrames)
    assert isinstance(VideoDiffusion().coupling, WidthFusion)
    nested = ProjectionGrid(depth=BatchDepth(), t_max=9).spec()  # components inside components
    assert nested["init_args"]["depth"] == {
        "class_path": "fourdgen.nn.grid_coupling.BatchDepth",
        "init_args": {},
    }
    again = build(nested)
    assert isinstance(again, ProjectionGrid) and again.t_max == 9 and isinstance(again.depth, BatchDepth)


def test_known_cell_sampling():
    """Known cells end exactly at ``x0``; without them it is plain Euler sampling."""
    g = torch.Generator().manual_seed(0)
    noise, x0 = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    velocity = lambda x, t: -x * t[:, None, None] / 1000  # noqa: E731
    torch.testing.assert_close(
        euler_sample_known(velocity, noise, x0, None, 5), euler_sample(velocity, noise, 5)
    )
    known = torch.zeros(1, 3, 1, dtype=torch.bool)
    known[:, 1] = True
    out = euler_sample_known(velocity, noise, x0, known, 5)
    torch.testing.assert_close(out[:, 1], x0[:, 1])
    seen = []
    euler_sample_known(lambda x, t: seen.append(x[:, 1].clone()) or velocity(x, t), noise, x0, known, 3)
    torch.testing.assert_close(seen[0], noise[:, 1])  # sigma = 1: the known cells are pure noise
    assert not torch.allclose(seen[1], noise[:, 1])  # then x0 noised to the step's level
