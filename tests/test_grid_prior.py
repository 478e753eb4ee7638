"""The Full-4D grid model as FMD's frozen prior: loading, one distillation step, the recipe end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fourdgen.backbones.text import HashTextEncoder
from fourdgen.data.scene_frames import SceneFramesDataModule
from fourdgen.data.synthetic import SyntheticConfig
from fourdgen.errors import ConfigError
from fourdgen.gaussians.fmd import FlowMatchingDistillation
from fourdgen.nn.grid_coupling import ProjectionGrid, ReferenceGrid
from fourdgen.stages.fit import Gaussian4DFitter
from fourdgen.stages.grid import GridDiffusion
from fourdgen.stages.grid_prior import GridPrior

ROOT = Path(__file__).resolve().parents[1]
WIDE = {"preset": "tiny", "overrides": {"num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 256}}
SCENE = SyntheticConfig(num_views=3, num_frames=5, height=32, width=32, layout="arc", supersample=1, seed=2)


def _save_grid_checkpoint(path, coupling=None, perturb=True):
    """A GridDiffusion checkpoint as Lightning writes it: hyper-parameters + the trainable tensors."""
    model = GridDiffusion(transformer=WIDE, coupling=coupling or ProjectionGrid(t_max=8), lpips_net=None)
    model.configure_model()
    if perturb:  # the zero-initialised branches would make the prior the base model
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    sd = {k: v for k, v in model.state_dict().items() if k in trainable}
    hp = {**dict(model.hparams), "_class_path": "fourdgen.stages.grid.GridDiffusion"}
    torch.save({"hyper_parameters": hp, "state_dict": sd, "global_step": 1}, path)
    return model


def _fitter_with(prior, tmp_path, **fmd):
    dm = SceneFramesDataModule(scene=str(tmp_path / "scene"), synthetic=SCENE, init_points=800)
    dm.prepare_data()
    reg = FlowMatchingDistillation(prior, source_view=0, guidance_scale=1.0, **fmd)
    model = Gaussian4DFitter(coarse_steps=0, lpips_net=None, path_samples=8, regularizers=[reg])
    model._trainer = None
    dm.setup()
    model.info = dm.scene_info()
    model._init_splats(model.info)
    reg.setup(model._source_clip(dm, reg))
    return model, reg


def test_prior_loads_frozen_from_a_checkpoint_and_refuses_what_it_cannot_use(tmp_path):
    saved = _save_grid_checkpoint(tmp_path / "grid.ckpt")
    prior = GridPrior(
        checkpoint=str(tmp_path / "grid.ckpt"), text_encoder=HashTextEncoder(32, 8), dtype="float32"
    )
    model = prior.load("cpu")
    assert not any(p.requires_grad for p in model.parameters())
    for name, p in saved.named_parameters():
        if p.requires_grad:  # the trained tensors came back
            torch.testing.assert_close(dict(model.named_parameters())[name], p.detach())
    with pytest.raises(ConfigError, match="exactly one"):
        GridPrior()
    with pytest.raises(ConfigError, match="not a file"):
        GridPrior(checkpoint=str(tmp_path / "missing.ckpt")).load()
    _save_grid_checkpoint(tmp_path / "ref.ckpt", coupling=ReferenceGrid(t_max=8), perturb=False)
    with pytest.raises(ConfigError, match="ProjectionGrid"):
        GridPrior(checkpoint=str(tmp_path / "ref.ckpt")).load()
    ckpt = torch.load(tmp_path / "grid.ckpt", weights_only=True)
    ckpt["state_dict"]["transformer.not_a_layer.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match="fit no parameter"):
        GridPrior(checkpoint=str(tmp_path / "other.ckpt"), dtype="float32").load()


def test_prior_loads_from_a_sharded_checkpoint_folder(tmp_path):
    """Full-4D's grid model trains under FSDP2, which saves folders: the prior reads one as it reads
    a file (Lightning's layout: torch.distributed.checkpoint shards + meta.pt)."""
    import torch.distributed.checkpoint as dcp

    saved = _save_grid_checkpoint(tmp_path / "grid.ckpt")
    ckpt = torch.load(tmp_path / "grid.ckpt", weights_only=True)
    folder = tmp_path / "last.ckpt"
    dcp.save({"state_dict": ckpt.pop("state_dict")}, checkpoint_id=folder, no_dist=True)
    torch.save(ckpt, folder / "meta.pt")
    model = GridPrior(checkpoint=str(folder), text_encoder=HashTextEncoder(32, 8), dtype="float32").load()
    trained = {n: p for n, p in saved.named_parameters() if p.requires_grad}
    for name, p in trained.items():
        torch.testing.assert_close(dict(model.named_parameters())[name], p.detach())


def test_prior_loads_a_lora_export_over_the_base_model(tmp_path):
    """A LoRA-tuned grid model: its export (LoRA + the coupling's new layers) plus the coupling spec."""
    model = GridDiffusion(transformer=WIDE, coupling=ProjectionGrid(t_max=8), lora_rank=4, lpips_net=None)
    model.configure_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    assert model.export_adapter(tmp_path / "lora")
    prior = GridPrior(
        export=str(tmp_path / "lora"), coupling=ProjectionGrid(t_max=8), transformer=WIDE, dtype="float32"
    )
    loaded = dict(prior.load().named_parameters())
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora" in n for n in trained) and any("camera_encoder" in n for n in trained)
    for name, p in trained.items():  # exports bake alpha / rank (32 / 4) into B
        want = p.detach() * (32 / 4 if "lora_B" in name else 1)
        torch.testing.assert_close(loaded[name], want, msg=name)
    with pytest.raises(ConfigError, match="coupling"):
        GridPrior(export=str(tmp_path / "lora")).load()


def test_one_fmd_step_moves_the_novel_latent_toward_the_prior_estimate(tmp_path):
    _save_grid_checkpoint(tmp_path / "grid.ckpt")
    prior = GridPrior(
        checkpoint=str(tmp_path / "grid.ckpt"), text_encoder=HashTextEncoder(32, 8), dtype="float32"
    )
    model, fmd = _fitter_with(prior, tmp_path, t_range=(0.5, 0.5))
    render = model._render_novel_view(None)
    loss = fmd(render)
    loss.backward()
    target = fmd.last_estimate  # x0_hat of this step, [1, C, F, h, w]
    assert target.shape[2] == 3  # 5 frames -> 3 latent frames through the (differentiable) tiny VAE
    assert not any(p.grad is not None for p in prior.model.parameters())  # the prior stays frozen
    before = float((prior.encode(render.rgb.detach()) - target).square().mean())
    with torch.no_grad():
        for p in model.splats.values():
            p -= 2.0 * p.grad / p.grad.norm().clamp_min(1e-12) * p.norm() * 1e-2
        after_render = model._render_novel_view(None)
    after = float((prior.encode(after_render.rgb) - target).square().mean())
    assert after < before
    # the source clip, its depth (the projection conditioning) and the rig reached the prior
    assert prior.source.depth is not None and prior.rig.shape == (3, 4, 4)
    # what the prior computed once is what the coupling computes for any novel camera
    b = prior.batch(render.K, model.camera_path()[1][3].expand(5, 4, 4))
    m = prior.model
    with torch.no_grad():
        torch.testing.assert_close(prior.source_depth, m.coupling.source_depth(b))
        fresh = m.encode_grid(m.coupling.project(b))[:, :1]
    torch.testing.assert_close(prior.source_cond, fresh, rtol=1e-4, atol=1e-5)


def test_tiny_fmd_recipe_fits_a_generated_grid_through_the_cli(tmp_path, monkeypatch):
    """The README's three commands: tiny/full4d.yaml trains the prior and writes a grid, and
    tiny/fit_fmd.yaml fits that grid with FMD, its source view and depth read from the scene (no
    hand edits, the recipe's own paths); a resumed fit continues with the same FMD term."""
    from fourdgen.cli import FourDGenCLI
    from fourdgen.data.scene import read_scene

    monkeypatch.chdir(tmp_path)
    grid = [f"--config={ROOT / 'lightning_configs/tiny/full4d.yaml'}", "--trainer.logger=false"]
    FourDGenCLI(args=["fit", *grid, "--trainer.max_steps=2", "--trainer.limit_val_batches=0"])
    ckpt = "outputs/tiny_full4d/checkpoints/last.ckpt"
    FourDGenCLI(args=["predict", *grid, "--model.init_args.sample_steps=2", f"--ckpt_path={ckpt}"])
    scene_dir = sorted(Path("outputs/tiny_full4d/predict").glob("*/scene"))[0]
    scene = read_scene(scene_dir)
    assert scene.source_view == 0 and scene.views[0].depth is not None
    assert all(v.depth is None for v in scene.views[1:])

    fit = [f"--config={ROOT / 'lightning_configs/tiny/fit_fmd.yaml'}", f"--data.init_args.scene={scene_dir}"]
    cli = FourDGenCLI(args=["fit", *fit, "--trainer.max_steps=22"])
    fmd = cli.model._regularizers[0]
    assert isinstance(fmd.prior, GridPrior) and fmd.prior.source.view == 0
    assert cli.trainer.callback_metrics["train/reg_fmd"] > 0  # FMD ran (from step 20, every 2)
    last = Path("outputs/tiny_fit_fmd/checkpoints/last.ckpt")
    sd = torch.load(last, weights_only=True)["state_dict"]
    assert not any("transformer" in k or "vae" in k for k in sd)  # no prior weights in the fit's checkpoint
    resumed = FourDGenCLI(args=["fit", *fit, "--trainer.max_steps=24", f"--ckpt_path={last}"])
    assert resumed.trainer.global_step == 24 and resumed.model._regularizers[0].prior.model is not None
