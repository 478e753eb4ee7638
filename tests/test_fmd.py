"""Flow-matching distillation in the 4DGS fitter: the loss, its plumbing, an oracle prior that must
help where no training camera looks, the Full-4D grid model as the prior, checkpoints and resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from fourdgen.data.scene_frames import SceneFramesDataModule
from fourdgen.data.synthetic import SyntheticConfig, make_scene, render_camera
from fourdgen.gaussians.deformation import DeformationField
from fourdgen.gaussians.fmd import FlowMatchingDistillation, VideoPrior
from fourdgen.geometry.visibility import covered_pixels
from fourdgen.metrics.image import pooled_psnr
from tests.test_fit import _fitter as fit_fitter

# An orbit of 5 views with view 2 held out: about half of its pixels are seen by no training camera.
SCENE = SyntheticConfig(num_views=5, num_frames=5, height=24, width=32, layout="orbit", supersample=1, seed=5)
HOLDOUT = 2


@pytest.fixture(scope="module")
def scene():
    return make_scene(SCENE)


class OraclePrior(VideoPrior):
    """The exact velocity toward the ground-truth clip of the sampled camera, ``v = (x - z_gt) / t``
    (so ``x0_hat = z_gt``), with a lossless 2x space-to-depth "encoder": FMD's plumbing without
    trained weights (the Wan VAE's own differentiability is tested with the grid prior below)."""

    def __init__(self, scene):
        self.scene, self.cache, self.calls = scene, {}, 0

    def setup(self, source, device):
        self.device, self.source = device, source

    def encode(self, rgb):
        return F.pixel_unshuffle(rgb * 2 - 1, 2).permute(1, 0, 2, 3)[None]  # [1, 12, T, h, w]

    def target(self, K, w2c):
        key = w2c[0].cpu().numpy().tobytes()
        if key not in self.cache:
            gt = render_camera(self.scene, K.cpu(), w2c.cpu()).permute(0, 3, 1, 2)
            self.cache[key] = self.encode(gt)
        return self.cache[key]

    def velocity(self, x, sigma, K, w2c, guidance_scale=1.0, generator=None):
        self.calls += 1
        return (x - self.target(K, w2c).to(x)) / sigma.view(-1, 1, 1, 1, 1)


def _dm(tmp_path, **kw):
    return SceneFramesDataModule(
        scene=str(tmp_path / "scene"), synthetic=SCENE, holdout_views=[HOLDOUT], init_points=2000, **kw
    )


def _fitter(steps, regularizers=(), **kw):
    """test_fit's fitter with a coarser field and a denser camera path."""
    torch.manual_seed(0)  # the deformation field's initial weights
    kw.setdefault(
        "deformation", DeformationField(features=8, resolution=(16, 16, 16, 4), multires=(1,), width=32)
    )
    return fit_fitter(steps, path_samples=24, regularizers=list(regularizers), **kw)


class _Losses(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        )


def _fit(tmp_path, model, steps, ckpt_path=None, **kw):
    L.seed_everything(0)
    losses = _Losses()
    trainer = L.Trainer(
        max_steps=steps,
        log_every_n_steps=1,  # the callback reads each step's losses
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[losses, *kw.pop("callbacks", [])],
        enable_checkpointing=kw.pop("enable_checkpointing", False),
    )
    trainer.fit(model, _dm(tmp_path), ckpt_path=ckpt_path)
    return trainer, losses.steps


def _heldout_psnr(model, scene) -> dict[str, float]:
    train = [v for v in range(SCENE.num_views) if v != HOLDOUT]
    seen = covered_pixels(scene.xyz[HOLDOUT], scene.K[train], scene.w2c[train], scene.depth[train])
    with torch.no_grad():
        pred = torch.stack(
            [
                model.render(
                    scene.times[i], scene.K[HOLDOUT : HOLDOUT + 1], scene.w2c[HOLDOUT, i : i + 1]
                ).rgb[0]
                for i in range(SCENE.num_frames)
            ]
        ).clamp(0, 1)
    gt, unseen = scene.rgb[HOLDOUT], (~seen)[..., None].expand(-1, -1, -1, 3)
    return {
        "seen": float(pooled_psnr(pred, gt, mask=~unseen)),
        "unseen": float(pooled_psnr(pred, gt, mask=unseen)),
        "unseen_share": float(unseen.float().mean()),
    }


def _oracle_fmd(scene, **kw):
    kw = {"weight": 1.0, "guidance_scale": 1.0, "source_view": 0, **kw}
    return FlowMatchingDistillation(OraclePrior(scene), **kw)


def test_covered_pixels_matches_a_per_pixel_reference(scene):
    train = [0, 1, 3]
    got = covered_pixels(scene.xyz[HOLDOUT, :2], scene.K[train], scene.w2c[train, :2], scene.depth[train, :2])
    H, W = SCENE.height, SCENE.width
    for t in range(2):
        for y in range(0, H, 3):
            for x in range(0, W, 3):
                p = scene.xyz[HOLDOUT, t, y, x]
                want = False
                for v in train:
                    c = scene.w2c[v, t, :3, :3] @ p + scene.w2c[v, t, :3, 3]
                    if c[2] <= 0:
                        continue
                    u = scene.K[v] @ (c / c[2])
                    col, row = int(torch.floor(u[0])), int(torch.floor(u[1]))
                    if 0 <= col < W and 0 <= row < H:
                        d = scene.depth[v, t, row, col]
                        want |= bool(d > 0 and abs(c[2] - d) <= 0.02 * d)
                assert bool(got[t, y, x]) == want, (t, y, x)
    assert 0.2 < got.float().mean() < 0.8  # the test scene really has unseen pixels


def test_fmd_loss_is_eq13_with_stop_gradient():
    """x0_hat = x_t - t v; loss = w(t) ||z - sg(x0_hat)||^2; the gradient is 2 w t (v - v_target) / N."""

    class Fixed(VideoPrior):
        def setup(self, source, device):
            self.v = None

        def encode(self, rgb):
            return rgb.permute(1, 0, 2, 3)[None]

        def velocity(self, x, sigma, K, w2c, guidance_scale=1.0, generator=None):
            self.v = torch.sin(3 * x) + guidance_scale
            return self.v

    from fourdgen.gaussians.regularizers import NovelViewRender

    prior = Fixed()
    for weighting in ("uniform", "sds"):
        fmd = FlowMatchingDistillation(
            prior, weighting=weighting, guidance_scale=2.0, t_range=(0.3, 0.7), seed=1
        )
        fmd.setup(object.__new__(type("S", (), {})))  # any source: this prior ignores it
        rgb = torch.rand(3, 3, 4, 5, requires_grad=True)
        render = NovelViewRender(
            rgb, rgb[:, :1], None, torch.eye(3), torch.eye(4), torch.linspace(0, 1, 3), step=7
        )
        loss = fmd(render)
        loss.backward()
        # the same draw of (t, noise), by hand
        g = torch.Generator().manual_seed(1 * 1_000_003 + 7)
        t = 0.3 + 0.4 * torch.rand(1, generator=g)
        noise = torch.randn(1, 3, 3, 4, 5, generator=g)
        z = rgb.detach().permute(1, 0, 2, 3)[None]
        x_t = (1 - t) * z + t * noise
        v = torch.sin(3 * x_t) + 2.0
        w = 1.0 if weighting == "uniform" else 1 / t
        assert float(loss.detach()) == pytest.approx(float(w * (z - (x_t - t * v)).square().mean()), rel=1e-5)
        grad = 2 * w * t * (v - (noise - z)) / z.numel()
        torch.testing.assert_close(rgb.grad, grad[0].permute(1, 0, 2, 3), rtol=1e-4, atol=1e-7)
        assert fmd.last["t"] == pytest.approx(float(t))


def test_fmd_options_are_checked():
    with pytest.raises(ValueError, match="t_range"):
        FlowMatchingDistillation(OraclePrior(None), t_range=(0.0, 0.5))
    with pytest.raises(ValueError, match="weighting"):
        FlowMatchingDistillation(OraclePrior(None), weighting="snr")
    with pytest.raises(ValueError, match="every"):
        FlowMatchingDistillation(OraclePrior(None), every=0)


def test_fmd_weight_zero_is_the_plain_fit_step_for_step(tmp_path, scene):
    _, plain = _fit(tmp_path / "a", _fitter(40), 40)
    model = _fitter(40, [_oracle_fmd(scene, weight=0.0)])
    _, fmd = _fit(tmp_path / "b", model, 40)
    assert model._regularizers[0].prior.calls == 40  # it ran at every step
    assert [s["train/loss"] for s in fmd] == [s["train/loss"] for s in plain]


@pytest.mark.slow
def test_oracle_prior_fills_what_no_training_camera_sees(tmp_path, scene):
    """The plumbing, honestly: with the exact velocity toward the true novel views, FMD must raise
    the held-out view's PSNR on the pixels no training camera sees, by a clear margin."""
    steps = 160
    plain = _fitter(steps)
    _fit(tmp_path / "plain", plain, steps)
    distilled = _fitter(steps, [_oracle_fmd(scene, every=2)])
    _fit(tmp_path / "fmd", distilled, steps)
    a, b = _heldout_psnr(plain, scene), _heldout_psnr(distilled, scene)
    assert b["unseen"] > a["unseen"] + 3.0, (a, b)  # measured: about +6 dB
    assert b["seen"] > a["seen"] - 0.5, (a, b)  # and it does not cost the seen pixels


def test_gradients_reach_only_gaussians_and_deformation_and_resume_continues(tmp_path, scene):
    fmd = _oracle_fmd(scene, start_step=4)
    model = _fitter(40, [fmd], coarse_steps=2)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=6, save_top_k=-1)
    _, full = _fit(tmp_path, model, 8, callbacks=[ckpt], enable_checkpointing=True)
    assert [("train/reg_fmd" in s) for s in full] == [False] * 4 + [True] * 4  # from start_step on
    # one more FMD backward: every trainable parameter is the fitter's own, and they get gradients
    model.zero_grad()
    fmd(model._render_novel_view(None)).backward()
    params = dict(model.named_parameters())
    assert all(k.startswith(("splats.", "deformation.")) for k in params)
    assert params["splats.sh0"].grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for k, p in params.items() if "deformation" in k)
    # the checkpoint holds the scene only, no prior
    (step6,) = (tmp_path / "ck").glob("*step=6*.ckpt")
    sd = torch.load(step6, weights_only=True)["state_dict"]
    assert all(k.startswith(("splats.", "deformation.", "bg", "scene_scale", "trained_steps")) for k in sd)
    # resumed at step 6 with the prior built anew: the same FMD term as the uninterrupted run's step 6
    _, cont = _fit(
        tmp_path / "r",
        _fitter(40, [_oracle_fmd(scene, start_step=4)], coarse_steps=2),
        8,
        ckpt_path=str(step6),
    )
    assert len(cont) == 2
    assert cont[0]["train/reg_fmd"] == pytest.approx(full[6]["train/reg_fmd"], rel=1e-5)
