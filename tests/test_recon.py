"""Stage 2, the feed-forward Gaussian reconstructor: pixel-aligned Gaussians against a plain
unprojection, the reconstructor starting from VGGT's point cloud, a tiny model learning a
synthetic scene (held-out PSNR), the static -> dynamic hand-over, and predict outputs."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fourdgen.backbones.vggt import VGGT
from fourdgen.backbones.vggt_checkpoint import official_state_dict
from fourdgen.callbacks.recon import ReconExport
from fourdgen.data.datamodules import GridDataModule
from fourdgen.gaussians.container import sh0_to_rgb
from fourdgen.gaussians.pixel_aligned import GAUSSIAN_CHANNELS, MAX_LOG_SCALE, pixel_gaussians
from fourdgen.gaussians.ply import load_ply_sequence
from fourdgen.geometry.cameras import intrinsics_from_fov, is_rigid, look_at
from fourdgen.models.gaussian_recon import GaussianReconstructor
from fourdgen.stages.common import NonFiniteGuard, check_finite_grads
from fourdgen.stages.recon import FeedForwardReconstruction, fit_to_patches

SYN = dict(num_views=4, num_frames=4, height=56, width=56, layout="arc", seed=3, supersample=1)


def _unproject_loop(depth, K, w2c):
    """Plain reference: pixel (i, j) centre -> camera ray * depth -> world, one pixel at a time."""
    H, W = depth.shape
    c2w = torch.linalg.inv(w2c)
    out = torch.zeros(H * W, 3)
    for j in range(H):
        for i in range(W):
            ray = torch.linalg.solve(K, torch.tensor([i + 0.5, j + 0.5, 1.0]))
            p = ray * depth[j, i]
            out[j * W + i] = c2w[:3, :3] @ p + c2w[:3, 3]
    return out


def test_zero_head_gives_the_coloured_point_cloud():
    torch.manual_seed(0)
    H, W = 5, 7
    depth = torch.rand(H, W) + 1.0
    K = intrinsics_from_fov(60.0, W, H)
    w2c = look_at(torch.tensor([0.5, -0.3, -3.0]), torch.zeros(3))
    rgb = torch.rand(3, H, W)
    g = pixel_gaussians(torch.zeros(GAUSSIAN_CHANNELS, H, W), rgb, depth, K, w2c)
    torch.testing.assert_close(g["means"], _unproject_loop(depth, K, w2c), atol=1e-5, rtol=1e-5)
    footprint = depth.flatten() / K[0, 0]
    torch.testing.assert_close(g["log_scales"], footprint.log()[:, None].expand(-1, 3))
    torch.testing.assert_close(g["quats"], torch.tensor([1.0, 0, 0, 0]).expand(H * W, 4))
    assert torch.equal(g["opacity_logits"], torch.zeros(H * W))
    torch.testing.assert_close(sh0_to_rgb(g["sh0"][:, 0]), rgb.flatten(1).T)
    # residuals move them; the scale residual is bounded
    raw = torch.zeros(GAUSSIAN_CHANNELS, H, W)
    raw[0], raw[4:7] = 0.25, 100.0
    g2 = pixel_gaussians(raw, rgb, depth, K, w2c)
    torch.testing.assert_close(g2["means"][:, 0], g["means"][:, 0] + 0.25)
    assert (g2["log_scales"] - g["log_scales"]).max() <= MAX_LOG_SCALE + 1e-5


def test_reconstructor_starts_from_vggt(tmp_path):
    """Loaded from an official-layout checkpoint with the head copied from the depth head, the
    initial Gaussians sit on VGGT's unprojected depth, one per pixel of every view per timestep."""
    torch.manual_seed(0)
    vggt = VGGT("tiny")  # with point head: its keys are skipped by the reconstructor
    torch.save(official_state_dict(vggt), tmp_path / "model.pt")
    model = GaussianReconstructor("tiny").eval()
    model.load_vggt(tmp_path / "model.pt")
    head, depth = model.gaussian_head.state_dict(), model.vggt.depth_head.state_dict()
    for k, v in depth.items():
        if not k.startswith("scratch.output_conv2.2"):
            assert torch.equal(head[k], v), k
    assert not model.gaussian_head.last_conv.weight.any()
    x = torch.rand(1, 2, 3, 3, 28, 42)
    with torch.no_grad():
        pred = model(x)
        ref = vggt.eval()(x)
    assert pred.gaussians["means"].shape == (1, 3, 2 * 28 * 42, 3)
    torch.testing.assert_close(pred.depth, ref.depth, atol=1e-5, rtol=1e-5)
    v, t = 1, 2  # view 1 at timestep 2: its block of the timestep's Gaussians
    means = pred.gaussians["means"][0, t, 28 * 42 : 2 * 28 * 42]
    K, w2c = pred.K[0, v, t], pred.w2c[0, v, t]
    torch.testing.assert_close(means, _unproject_loop(pred.depth[0, v, t], K, w2c), atol=1e-3, rtol=1e-3)
    assert torch.equal(pred.w2c, pred.w2c[:, :, :1].expand_as(pred.w2c))  # shared over time
    K_t, w2c_t = model.target_cameras(x[:, 0, 0], x[:, 1:, 0])
    assert K_t.shape == (1, 1, 3, 3) and w2c_t.shape == (1, 1, 4, 4)


def test_fit_to_patches():
    x = torch.rand(2, 3, 100, 150)
    assert fit_to_patches(x, 14).shape == (2, 3, 98, 154)
    assert fit_to_patches(x, 14, max_width=70).shape == (2, 3, 42, 70)
    y = torch.rand(3, 28, 42)
    assert fit_to_patches(y, 14) is y


def _dm(tmp_path, num_frames=1, num_views=4, **kw):
    return GridDataModule(
        root=str(tmp_path / "scenes"),
        num_views=num_views,
        num_frames=num_frames,
        height=56,
        width=56,
        crop="center",
        load_depth=False,
        load_xyz=False,
        load_mask=False,
        samples_per_scene=20,
        synthetic=SYN,
        **kw,
    )


def _trainer(tmp_path, steps, **kw):
    kw = {"limit_val_batches": 1, "logger": False, **kw}
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **kw,
    )


@pytest.mark.slow  # convergence test: in the default suite, deselect with -m 'not slow'
def test_tiny_reconstructor_learns_a_synthetic_scene(tmp_path):
    """Static stage (frozen random backbone, Gaussian head trained): held-out views rendered from
    the predicted Gaussians get measurably closer to the ground truth."""
    torch.manual_seed(0)
    dm = _dm(tmp_path)
    model = FeedForwardReconstruction(lr=3e-3, warmup_steps=5, lpips_weight=0.0, lpips_net=None)
    assert {n.split(".")[0] for n, p in model.model.named_parameters() if p.requires_grad} == {
        "gaussian_head"
    }
    frozen = {k: v.clone() for k, v in model.model.vggt.state_dict().items()}
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    trainer = _trainer(tmp_path, 160, enable_checkpointing=False, logger=logger)
    before = trainer.validate(model, dm, verbose=False)[0]["val/psnr"]
    trainer.fit(model, dm)
    after = trainer.validate(model, dm, verbose=False)[0]["val/psnr"]
    assert after > before + 1.5, (before, after)
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert "val/render_vs_target" in acc.Tags()["images"] and "train/loss" in acc.Tags()["scalars"]
    assert all(torch.equal(v, model.model.vggt.state_dict()[k]) for k, v in frozen.items())


def test_dynamic_stage_starts_from_the_static_one_and_trains_temporal_blocks(tmp_path):
    torch.manual_seed(0)
    static = FeedForwardReconstruction(lr=1e-3, lpips_weight=0.0, lpips_net=None, temporal=False)
    trainer = _trainer(tmp_path / "a", 3, limit_val_batches=0)
    trainer.fit(static, _dm(tmp_path))
    ckpt = tmp_path / "a" / "static.ckpt"
    trainer.save_checkpoint(ckpt)
    dynamic = FeedForwardReconstruction(
        training_stage="dynamic", init_checkpoint=str(ckpt), lr=1e-3, lpips_weight=0.0, lpips_net=None
    )
    trainable = {n for n, p in dynamic.model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("gaussian_head.", "vggt.aggregator.temporal_blocks.")) for n in trainable
    )
    assert any("temporal_blocks" in n for n in trainable)
    dm = _dm(tmp_path, num_frames=2)
    _trainer(tmp_path / "b", 3, limit_val_batches=0, enable_checkpointing=False).fit(dynamic, dm)
    sd = static.model.state_dict()
    for k, v in dynamic.model.state_dict().items():
        if k.startswith("vggt.") and "temporal_blocks" not in k:
            assert torch.equal(v, sd[k]), k  # the frozen backbone is the static stage's
    assert any(dynamic.model.vggt.aggregator.temporal_blocks[0].attn.proj.weight.flatten() != 0)
    quiet = dict(lpips_weight=0.0, lpips_net=None)
    with pytest.raises(ValueError, match="num_source_views"):
        FeedForwardReconstruction(num_source_views=3, num_target_views=3, **quiet).split_views(4, True)
    with pytest.raises(ValueError, match="no sub-module"):
        FeedForwardReconstruction(train_modules=["nonsense"], **quiet)


def test_predict_writes_gaussians_cameras_and_a_path_video(tmp_path):
    torch.manual_seed(0)
    dm = _dm(tmp_path, num_frames=None, num_views=None)
    model = FeedForwardReconstruction(lpips_weight=0.0, lpips_net=None)
    out = tmp_path / "out"
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[ReconExport(str(out), 8)]
    )
    trainer.predict(model, dm, return_predictions=False)
    scene = out / "synth_000"
    plys = load_ply_sequence(scene / "gaussians")
    assert len(plys) == SYN["num_frames"] and len(plys[0]) == SYN["num_views"] * 56 * 56
    cams = json.loads((scene / "cameras.json").read_text())
    assert len(cams["views"]) == SYN["num_views"] and cams["shared_over_time"] is True
    w2c = torch.tensor([v["w2c"] for v in cams["views"]])
    assert w2c.shape == (SYN["num_views"], 4, 4) and is_rigid(w2c).all()
    assert (scene / "render_path.mp4").stat().st_size > 0
    # PLYs can leave out faint Gaussians (opacities start at 0.5: a 0.6 floor drops all of them)
    model.model.gaussian_head.last_conv.bias.data[3] = 1.0  # opacity logit of every pixel
    thin = ReconExport(str(tmp_path / "thin"), 4, min_opacity=0.6)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[thin]).predict(
        model, dm, return_predictions=False
    )
    assert len(load_ply_sequence(tmp_path / "thin" / "synth_000" / "gaussians")[0]) == len(plys[0])
    model.model.gaussian_head.last_conv.bias.data[3] = -1.0
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[thin]).predict(
        model, dm, return_predictions=False
    )
    assert len(load_ply_sequence(tmp_path / "thin" / "synth_000" / "gaussians")[0]) == 0


def test_predict_on_a_stage_1b_output(tmp_path, tiny_synthetic):
    """A grid written by stage 1b's GridVideoWriter (cameras unknown) reconstructs as it is; the
    frames are resized onto VGGT's patch grid (32 x 40 -> 28 x 42)."""
    from fourdgen.callbacks.grid import write_grid

    rgb = torch.as_tensor(tiny_synthetic.rgb).permute(0, 1, 4, 2, 3)[:, :3] * 2 - 1  # [V, T, 3, H, W]
    folder = write_grid({"scene_id": "gen", "rgb": rgb, "K": None, "w2c": None}, tmp_path, write_views=False)
    dm = GridDataModule(
        root=str(folder / "scene"), crop="center", load_depth=False, load_xyz=False, load_mask=False
    )
    out = tmp_path / "out"
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[ReconExport(str(out), 4)]
    )
    with pytest.warns(UserWarning, match="scene"):
        trainer.predict(
            FeedForwardReconstruction(lpips_weight=0.0, lpips_net=None), dm, return_predictions=False
        )
    (scene,) = [p for p in out.iterdir() if p.is_dir()]
    cams = json.loads((scene / "cameras.json").read_text())
    assert cams["image_size"] == [28, 42] and len(cams["views"]) == rgb.shape[0]
    assert len(load_ply_sequence(scene / "gaussians")) == 3


def test_resume_restores_weights_over_the_vggt_checkpoint(tmp_path):
    """``fit`` loads vggt_checkpoint in setup, before Lightning restores a resumed checkpoint: the
    resumed run continues from the trained weights and step, not from the VGGT file."""
    torch.manual_seed(0)
    torch.save(official_state_dict(VGGT("tiny")), tmp_path / "model.pt")
    kw = dict(vggt_checkpoint=str(tmp_path / "model.pt"), lr=1e-3, lpips_weight=0.0, lpips_net=None)
    first = FeedForwardReconstruction(**kw)
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, 3, limit_val_batches=0, callbacks=[ckpt_cb]).fit(first, _dm(tmp_path))
    trained = {k: v.clone() for k, v in first.model.gaussian_head.state_dict().items()}
    second = FeedForwardReconstruction(**kw)
    seen = {}

    class Spy(L.Callback):
        def on_train_start(self, trainer, module):
            seen["step"] = trainer.global_step
            seen["head"] = {k: v.clone() for k, v in module.model.gaussian_head.state_dict().items()}

    resumed = _trainer(tmp_path, 5, limit_val_batches=0, callbacks=[Spy()], enable_checkpointing=False)
    resumed.fit(second, _dm(tmp_path), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert seen["step"] == 3 and resumed.global_step == 5
    assert all(torch.equal(seen["head"][k], v) for k, v in trained.items())


def test_non_finite_gradients_stop_before_the_step():
    lin = torch.nn.Linear(2, 2)
    lin(torch.ones(1, 2)).sum().backward()
    check_finite_grads(lin, 0)  # finite: nothing happens
    lin.bias.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 7 in 1 parameters \(\['bias'\]"):
        check_finite_grads(lin, 7)


class _FusedToy(NonFiniteGuard, L.LightningModule):
    """One weight, fused Adam; its gradient is NaN at ``bad_step`` (the loss stays finite)."""

    def __init__(self, bad_step: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.bad_step, self.after = bad_step, []  # the weight after each step's update
        self.w.register_hook(lambda g: g * float("nan") if self.global_step == self.bad_step else g)

    def training_step(self, batch, batch_idx):
        return (self.w * batch).sum()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.after.append(self.w.detach().clone())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1, fused=True)


def test_fused_optimizer_skips_a_non_finite_step_on_device_and_stops_at_the_next_start(tmp_path):
    model = _FusedToy(bad_step=2)
    data = torch.utils.data.DataLoader(torch.ones(8, 3), batch_size=1)
    trainer = L.Trainer(
        max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"step 2 in 1 parameters \(\['w'\]"):
        trainer.fit(model, data)
    # step 2's update did not happen (weights, moments and step count as after step 1), and the
    # error came at step 3's start, before its forward
    assert len(model.after) == 3
    torch.testing.assert_close(model.after[2], model.after[1])
    assert not torch.equal(model.after[1], model.after[0])
    state = trainer.optimizers[0].state[model.w]
    assert int(state["step"]) == 2 and torch.isfinite(state["exp_avg"]).all()
    # a finite run: the last step's check is resolved at the end, and passes
    ok = _FusedToy(bad_step=-1)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, accelerator="cpu")  # fmt: skip
    trainer.fit(ok, data)
    assert len(ok.after) == 3 and "_pending_checks" not in ok.__dict__


def test_compile_blocks_wraps_every_transformer_block_and_changes_nothing():
    torch.manual_seed(0)
    model = GaussianReconstructor("tiny").eval()
    x = torch.rand(1, 2, 2, 3, 28, 28)
    with torch.no_grad():
        ref = model(x)
        model.vggt.compile_blocks(backend="eager")  # the plumbing; inductor's numerics: tests/gpu
        got = model(x)
    blocks = model.vggt.blocks()
    agg = model.vggt.aggregator
    assert len(blocks) == len(agg.patch_embed.blocks) + 4 * len(agg.frame_blocks)  # + 2 x depth temporal
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    for k, v in ref.gaussians.items():
        torch.testing.assert_close(got.gaussians[k], v, msg=k)
