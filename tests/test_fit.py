"""Stage 3: 4D Gaussian fitter (HexPlane, budgeted densification, resume, NaN guard, export)."""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v2 as iio
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fourdgen.batch import GridBatch
from fourdgen.callbacks.export import Export4DGS
from fourdgen.data.scene_frames import SceneFramesDataModule
from fourdgen.data.synthetic import SyntheticConfig, make_scene
from fourdgen.errors import ConfigError
from fourdgen.gaussians.deformation import DeformationField
from fourdgen.gaussians.densify import BudgetStrategy
from fourdgen.gaussians.hexplane import PLANES, HexPlane
from fourdgen.gaussians.optim import LearningRates
from fourdgen.gaussians.ply import load_ply
from fourdgen.gaussians.regularizers import NovelViewRegularizer
from fourdgen.geometry.visibility import covered_pixels
from fourdgen.metrics.image import pooled_psnr
from fourdgen.stages.fit import Gaussian4DFitter, compile_dynamic

COVERED_BOUND = 25.0  # dynamic fit: 26.39 dB measured (static: 20.57; before temporal opacity 22.56)
SCENE = SyntheticConfig(
    num_views=4, num_frames=6, height=24, width=32, layout="arc", arc_degrees=50, supersample=2, seed=5
)


def _dm(tmp_path, **kw):
    return SceneFramesDataModule(
        scene=str(tmp_path / "scene"),
        synthetic=SCENE,
        holdout_views=[2],
        init_points=kw.pop("init_points", 2500),
        **kw,
    )


def _budget(every: int, **kw) -> BudgetStrategy:
    """Densification from step ``every``, every ``every`` steps, up to 4000 Gaussians, no pruning."""
    defaults = dict(refine_stop_iter=10**6, reset_every=10**6, max_gaussians=4000, prune_to=0)
    return BudgetStrategy(refine_start_iter=every, refine_every=every, **{**defaults, **kw})


def _fitter(steps: int, **kw) -> Gaussian4DFitter:
    defaults = dict(
        coarse_steps=steps // 4,
        init_opacity=0.3,
        lpips_net=None,
        path_samples=8,
        deformation=DeformationField(features=8, resolution=(32, 32, 32, 6), multires=(1,), width=32),
        densify=_budget(40),
        lr=LearningRates(
            max_steps=steps, deformation=1.6e-3, deformation_final=1.6e-4, grid=1.6e-2, grid_final=1.6e-3
        ),
    )
    return Gaussian4DFitter(**{**defaults, **kw})


def _trainer(tmp_path, steps, **kw):
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("accelerator", "cpu")
    return L.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        **kw,
    )


# ----------------------------------------------------------------------------------- HexPlane
def _bilinear(plane, u, v):
    """Plain reference: bilinear lookup, align_corners=True, border clamp. plane [C, H, W]."""
    C, H, W = plane.shape
    x = min(max((u + 1) / 2 * (W - 1), 0.0), W - 1.0)
    y = min(max((v + 1) / 2 * (H - 1), 0.0), H - 1.0)
    x0, y0 = math.floor(x), math.floor(y)
    x1, y1 = min(x0 + 1, W - 1), min(y0 + 1, H - 1)
    fx, fy = x - x0, y - y0
    return (
        plane[:, y0, x0] * (1 - fx) * (1 - fy)
        + plane[:, y0, x1] * fx * (1 - fy)
        + plane[:, y1, x0] * (1 - fx) * fy
        + plane[:, y1, x1] * fx * fy
    )


def test_hexplane_matches_reference():
    torch.manual_seed(0)
    hp = HexPlane(features=3, resolution=(5, 6, 7, 4), multires=(1, 2))
    for planes in hp.levels:
        for p in planes:
            p.data.uniform_(0.5, 1.5)
    hp.set_bounds(torch.tensor([-2.0, -1, 0]), torch.tensor([2.0, 3, 1]))
    xyz = torch.rand(7, 3) * torch.tensor([5.0, 5, 2]) - torch.tensor([2.5, 1.5, 0.5])  # some outside
    t = torch.rand(7)
    out = hp(xyz, t)
    coords = hp.normalize(xyz, t)
    for n in range(7):
        ref = []
        for planes in hp.levels:
            f = torch.ones(3)
            for (a, b), p in zip(PLANES, planes, strict=True):
                f = f * _bilinear(p[0], float(coords[n, a]), float(coords[n, b]))
            ref.append(f)
        torch.testing.assert_close(out[n], torch.cat(ref), rtol=1e-5, atol=1e-5)


def test_hexplane_shared_time_path_matches_grid_sample():
    """One time for all points takes the matmul path; values and gradients equal grid_sample's."""
    torch.manual_seed(1)
    hp = HexPlane(features=4, resolution=(5, 6, 7, 9), multires=(1, 2), shared_time_matmul=True).double()
    for planes in hp.levels:
        for p in planes:
            p.data.uniform_(0.5, 1.5)
    xyz = (torch.rand(200, 3, dtype=torch.float64) * 2.4 - 1.2).requires_grad_(True)  # some outside
    grads = []
    for t in (torch.tensor(0.37, dtype=torch.float64), torch.full((200,), 0.37, dtype=torch.float64)):
        # scalar t: the matmul path for the time planes; [N] t: grid_sample for all planes
        out = hp(xyz, t)
        (out * torch.linspace(-1, 1, out.shape[1], dtype=torch.float64)).sum().backward()
        grads.append((out.detach(), xyz.grad.clone(), [p.grad.clone() for p in hp.parameters()]))
        xyz.grad = None
        hp.zero_grad(set_to_none=True)
    (o1, x1, p1), (o2, x2, p2) = grads
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(x1, x2)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b)
    assert x1.abs().sum() > 0 and all(g.abs().sum() > 0 for g in p1)


def test_deformation_starts_static_and_time_planes_regularise():
    field = DeformationField(features=4, resolution=(8, 8, 8, 5), multires=(1,), width=16)
    d = field(torch.randn(50, 3), 0.7)
    assert d.d_means.abs().max() == 0 and d.d_log_scales.abs().max() == 0 and d.d_quats.abs().max() == 0
    reg = field.regularization()
    assert reg["time_l1"] == 0 and reg["time_smooth"] == 0  # time planes start at exactly 1
    field.grid.levels[0][2].data[..., 2, :] += 1.0  # a bump in time on the xt plane
    reg = field.regularization()
    assert reg["time_l1"] > 0 and reg["time_smooth"] > 0 and reg["tv"] > 0


# -------------------------------------------------------------------------------- budget
def _fake_params(n):
    return nn.ParameterDict(
        {
            "means": torch.randn(n, 3),
            "scales": torch.full((n, 3), -6.0),  # below grow_scale3d: duplicate
            "quats": F.normalize(torch.randn(n, 4), dim=-1),
            "opacities": torch.zeros(n),
            "sh0": torch.zeros(n, 1, 3),
            "shN": torch.zeros(n, 0, 3),
        }
    )


def _refine(strategy, params, grads, step=100):
    opts = {k: torch.optim.Adam([params[k]]) for k in params}
    state = strategy.initialize_state(scene_scale=1.0)
    state["grad2d"], state["count"] = grads.clone(), torch.ones_like(grads)
    strategy._grow_gs(params, opts, state, step)
    strategy._prune_gs(params, opts, state, step)
    return params


def test_compiled_deformation_does_not_recompile_when_gaussians_change():
    """Densification changes the number of Gaussians (an nn.Parameter): one dynamic graph serves
    all sizes, and all times. Plain ``torch.compile(dynamic=True)`` recompiles per size on a
    Parameter input (and per value of a float time: 81 recompiles at export on the device)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    field = DeformationField(features=4, resolution=(4, 4, 4, 3), multires=(1,), width=8)
    sizes = (50, 41, 37, 64)
    counters = {}
    for name, make in (
        ("ours", compile_dynamic),
        ("plain", lambda f, backend: torch.compile(f, dynamic=True, backend=backend)),
    ):
        counter = CompileCounter()
        fn = make(field.forward, backend=counter)
        for n, t in zip(sizes, (0.5, 0.3, 0.7, 0.1), strict=True):  # a new time per call, too
            means = nn.Parameter(torch.rand(n, 3))
            out = fn(means, t)
            out.d_means.sum().backward()
            assert means.grad is not None and means.grad.shape == (n, 3)
            ref = field(means, t)
            torch.testing.assert_close(out.d_means, ref.d_means)
        counters[name] = counter.frame_count
        if name == "ours":  # export: no grad, 81 float times; one more graph, not one per time
            with torch.no_grad():
                for t in torch.linspace(0, 1, 9).tolist():
                    torch.testing.assert_close(fn(means, t).d_means, field(means, t).d_means)
            assert counter.frame_count == 2, counter.frame_count
        torch._dynamo.reset()
    assert counters["ours"] == 1
    assert counters["plain"] > 1  # the failure mode compile_dynamic exists for


def test_budget_caps_growth_and_prunes_only_above_prune_to():
    s = BudgetStrategy(max_gaussians=130, prune_to=80, grow_grad2d=0.1, prune_opa=0.015, reset_every=10**6)
    p = _fake_params(100)
    grads = torch.zeros(100)
    grads[:50] = torch.linspace(0.2, 1.0, 50)  # 50 candidates, room for 30
    p = _refine(s, p, grads)
    assert len(p["means"]) == 130
    # the 30 highest-gradient candidates (indices 20..49) were duplicated: their copies are appended
    torch.testing.assert_close(p["means"][100:], p["means"][20:50])
    # 130 > prune_to: transparent ones go
    p["opacities"].data[:] = 5.0
    p["opacities"].data[:40] = -10.0
    p = _refine(s, p, torch.zeros(130))
    assert len(p["means"]) == 90
    # at or below prune_to nothing is pruned
    p2 = _fake_params(60)
    p2["opacities"].data[:] = -10.0
    assert len(_refine(s, p2, torch.zeros(60))["means"]) == 60


def test_opacity_reset_runs():
    s = BudgetStrategy(reset_every=10, refine_start_iter=10**6, prune_opa=0.015)
    p = _fake_params(5)
    p["opacities"].data[:] = 3.0
    opts = {k: torch.optim.Adam([p[k]]) for k in p}
    state = s.initialize_state()
    info = {
        "width": 8,
        "height": 8,
        "n_cameras": 1,
        "radii": torch.ones(1, 5, 2),
        "gaussian_ids": None,
        "means2d": torch.zeros(1, 5, 2, requires_grad=True),
    }
    info["means2d"].grad = torch.zeros(1, 5, 2)
    s.step_post_backward(p, opts, state, step=10, info=info)
    assert torch.sigmoid(p["opacities"]).max() <= 0.03 + 1e-6


# ------------------------------------------------------------------------------- fitting
@pytest.mark.slow
def test_dynamic_fit_beats_static_on_moving_objects(tmp_path):
    """The done criterion of stage 3: with real motion, deformation must clearly win on the moving
    objects of a held-out view (and the fit must learn at all)."""
    steps = 700
    results = {}
    for name, deform in (("static", False), ("dynamic", True)):
        L.seed_everything(0)
        # dynamic as the recipes fit: time-localised Gaussians, static background not deformed
        dm = _dm(tmp_path, init_frames="all", split_static=deform)
        model = _fitter(steps, deform=deform, temporal_opacity=deform)
        trainer = _trainer(tmp_path, steps)
        trainer.fit(model, dm)
        results[name] = trainer.test(model, dm, verbose=False)[0]
        results[name]["covered"] = _covered_heldout_psnr(model, make_scene(SCENE), holdout=2)
    init = _trainer(tmp_path, 0).test(_fitter(steps), _dm(tmp_path), verbose=False)[0]
    print({k: {m: round(v, 2) for m, v in r.items()} for k, r in {**results, "init": init}.items()})
    assert results["dynamic"]["test/psnr"] > init["test/psnr"] + 3
    # measured 28.00 vs 18.08 (the deformation field alone, before temporal opacity: +1.5 to +2)
    assert results["dynamic"]["test/psnr_dynamic"] > results["static"]["test/psnr_dynamic"] + 6
    # what the training cameras saw of the held-out view must be reconstructed
    assert results["dynamic"]["covered"] > COVERED_BOUND, results


def test_train_depth_serves_each_training_frames_depth_at_the_served_size(tmp_path):
    dm = _dm(tmp_path, train_depth=True, height=12, width=16)  # half size: nearest, no crop
    dm.prepare_data()
    dm.setup()
    scene = make_scene(SCENE)  # the exact depth the scene folder holds
    seen = set()
    for b in dm.train_dataloader():
        v, t = int(b.view_ids[0, 0]), int(b.time_ids[0, 0])
        want = F.interpolate(scene.depth[v, t][None, None], size=(12, 16), mode="nearest-exact")[0, 0]
        assert b.depth.shape == (1, 1, 1, 1, 12, 16)
        torch.testing.assert_close(b.depth[0, 0, 0, 0], want, rtol=1e-3, atol=1e-3)  # stored float16
        seen.add(v)
    assert seen == {0, 1, 3}  # the held-out view 2 is never served
    plain = _dm(tmp_path)
    plain.setup()
    assert next(iter(plain.train_dataloader())).depth is None  # off by default


def test_a_gathered_batch_holds_each_frame_with_its_camera_time_and_depth(tmp_path):
    dm = _dm(tmp_path, train_depth=True, repeat=2)
    dm.prepare_data()
    dm.setup()
    d, ds = dm._loaded, dm.train_dataloader().dataset
    assert ds.rgb.device.type == "cpu"  # no trainer on CUDA: the frames stay on the host
    idx = [0, 7, len(ds) - 1]  # the last index is in the second pass (repeat 2)
    b = ds.__getitems__(idx)
    H, W = d["out_hw"]
    assert b.rgb.shape == (3, 1, 1, 3, H, W) and b.depth.shape == (3, 1, 1, 1, H, W) and b.observed.all()
    for i, k in enumerate(idx):
        vi, t = divmod(k % (len(ds.views) * ds.T), ds.T)
        v = d["train"][vi]
        assert (int(b.view_ids[i, 0]), int(b.time_ids[i, 0])) == (v, t)
        torch.testing.assert_close(b.rgb[i, 0, 0], d["rgb"][v, t].float() / 127.5 - 1)
        torch.testing.assert_close(b.K[i, 0], d["K"][v])
        torch.testing.assert_close(b.w2c[i, 0, 0], d["w2c"][v, t])
        torch.testing.assert_close(b.times[i, 0], d["times"][t])
        torch.testing.assert_close(b.depth[i, 0, 0, 0], d["train_depth"][vi, t].float())
    # the loader's batches are these gathers; a single frame is a batch of one
    torch.testing.assert_close(ds[7].rgb, b.rgb[1:2])


def test_depth_weight_without_depth_in_the_batches_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model.depth_weight: 0.1 .* data.train_depth: true"):
        _trainer(tmp_path, 2).fit(_fitter(2, depth_weight=0.1), _dm(tmp_path))


def _covered_heldout_psnr(model, scene, holdout: int) -> float:
    """PSNR over the held-out view's pixels that some training camera sees (exact geometry)."""
    train = [v for v in range(scene.rgb.shape[0]) if v != holdout]
    seen = covered_pixels(scene.xyz[holdout], scene.K[train], scene.w2c[train], scene.depth[train])
    with torch.no_grad():
        pred = torch.stack(
            [
                model.render(t, scene.K[holdout : holdout + 1], scene.w2c[holdout, i : i + 1]).rgb[0]
                for i, t in enumerate(scene.times)
            ]
        ).clamp(0, 1)
    return float(pooled_psnr(pred, scene.rgb[holdout], mask=seen[..., None].expand_as(pred)))


class _Recorder(NovelViewRegularizer):
    name = "recorder"

    def __init__(self):
        super().__init__(weight=0.5)
        self.frozen = nn.Linear(4, 4)  # a "loaded" model: must not reach the fitter's checkpoint
        self.frozen.requires_grad_(False)
        self.calls = []

    def forward(self, render):
        self.calls.append(render.rgb.shape)
        return render.rgb.mean()


def test_regularizer_slot_and_checkpoint(tmp_path):
    reg = _Recorder()
    model = _fitter(8, regularizers=[reg], coarse_steps=2)
    trainer = _trainer(tmp_path, 3)
    trainer.fit(model, _dm(tmp_path, init_points=300))
    assert reg.calls == [(6, 3, 24, 32)] * 3  # the whole clip from one novel camera each step
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    keys = torch.load(tmp_path / "c.ckpt", weights_only=False)["state_dict"].keys()
    assert not any("frozen" in k or "recorder" in k for k in keys)
    # gradients of the regulariser reach the Gaussians
    model.splats["sh0"].grad = None
    out = model._render_novel_view(None)
    reg(out).backward()
    assert model.splats["sh0"].grad.abs().sum() > 0


class _NaN(NovelViewRegularizer):
    name = "nan"

    def forward(self, render):
        return render.rgb.sum() * float("nan")


def test_nan_loss_stops_before_corrupting_weights(tmp_path):
    model = _fitter(8, regularizers=[_NaN(start_step=2)])
    trainer = _trainer(tmp_path, 5)
    with pytest.raises(FloatingPointError, match="train/reg_nan is nan at global step 2"):
        trainer.fit(model, _dm(tmp_path, init_points=300))
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _NaNOnce(NovelViewRegularizer):
    """NaN at its first call (``kind="loss"``), or a finite 0 whose gradient is NaN (``"grad"``:
    d sqrt(x) / dx at 0 times 0)."""

    name = "fault"

    def __init__(self, kind: str, **kw):
        super().__init__(**kw)
        self.kind, self.calls = kind, 0

    def forward(self, render):
        self.calls += 1
        if self.calls > 1:
            return render.rgb.sum() * 0.0
        if self.kind == "loss":
            return render.rgb.sum() * float("nan")
        return (render.rgb.sum() * 0.0).sqrt()


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_skip_policy_skips_the_batch_and_keeps_training(tmp_path, kind):
    model = _fitter(8, regularizers=[_NaNOnce(kind, start_step=2)], on_nonfinite="skip")
    trainer = _trainer(tmp_path, 5)
    with pytest.warns(UserWarning, match=r"at global step 2: batch skipped \(on_nonfinite: skip; 1 so far"):
        trainer.fit(model, _dm(tmp_path, init_points=300))
    assert trainer.global_step == 5 and model.skipped_batches == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    stop = _fitter(8, regularizers=[_NaNOnce(kind, start_step=2)])
    what = "train/reg_fault is nan" if kind == "loss" else "non-finite gradients"
    with pytest.raises(FloatingPointError, match=f"{what} at global step 2"):
        _trainer(tmp_path, 5).fit(stop, _dm(tmp_path, init_points=300))
    assert all(torch.isfinite(p).all() for p in stop.parameters())


def _fixed_loss(model: Gaussian4DFitter, dm) -> float:
    """Photometric loss of every training frame, deformation on (no randomness)."""
    batch = GridBatch.collate([dm.train_dataloader().dataset[i] for i in range(8)])
    with torch.no_grad():
        total = 0.0
        for i in range(len(batch.rgb)):
            out = model.render(batch.times[i, 0], batch.K[i, :1], batch.w2c[i, 0, :1], deform=True)
            total += float((out.rgb[0].permute(2, 0, 1) - (batch.rgb[i, 0, 0] + 1) / 2).abs().mean())
    return total


class _AtTrainStart(L.Callback):
    def __init__(self, fn):
        self.fn, self.value = fn, None

    def on_train_start(self, trainer, pl_module):
        self.value = self.fn(pl_module, trainer.datamodule)


def test_resume_mid_fine_stage_with_changed_number_of_gaussians(tmp_path):
    """Checkpoint in the fine stage after densification; the resumed fit starts from exactly the
    saved Gaussians, deformation and Adam moments (so the loss cannot jump), then keeps training."""
    dm = _dm(tmp_path, init_points=400)
    densify = dict(
        refine_start_iter=5,
        refine_every=5,
        grow_grad2d=1e-6,
        max_gaussians=700,
        prune_to=10**6,
        reset_every=10**6,
    )
    model = _fitter(200, coarse_steps=6, densify=BudgetStrategy(**densify))
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=12
    )
    trainer = _trainer(tmp_path, 12, callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(model, dm)
    n = len(model.splats["means"])
    assert 400 < n <= 700 and model.is_fine
    assert model.deformation.pos_head[-1].weight.abs().sum() > 0  # the deformation has trained
    before = _fixed_loss(model, dm)
    saved_opt = trainer.optimizers[0].state_dict()

    resumed = _fitter(200, coarse_steps=6, densify=BudgetStrategy(**densify))
    probe = _AtTrainStart(_fixed_loss)
    t2 = _trainer(tmp_path, 16, callbacks=[probe])
    t2.fit(resumed, _dm(tmp_path, init_points=400), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert probe.value == pytest.approx(before, rel=1e-6)  # same model at the resume point: no jump
    assert t2.global_step == 16 and resumed.is_fine
    assert len(resumed.splats["means"]) >= n
    state = t2.optimizers[0].state[resumed.splats["means"]]
    assert state["exp_avg"].shape == resumed.splats["means"].shape
    assert float(state["step"]) == float(saved_opt["state"][0]["step"]) + 4  # moments continued
    assert _fixed_loss(resumed, resumed.trainer.datamodule) < before * 1.05


def test_random_init_without_geometry_and_export(tmp_path):
    dm = _dm(tmp_path)
    dm.prepare_data()
    dm.setup()
    scene = dm._loaded["scene"]
    for v in scene.views:  # a scene with RGB and cameras only
        v.xyz = v.depth = None
    model = _fitter(4, init_random_points=500, init_random_depth=(2.0, 8.0))
    export = Export4DGS(out_dir=str(tmp_path / "out"), path_samples=5)
    trainer = _trainer(tmp_path, 2, callbacks=[export])
    trainer.fit(model, dm)
    assert len(model.splats["means"]) == 500
    plys = sorted((tmp_path / "out/ply").glob("*.ply"))
    assert len(plys) == 6 and len(load_ply(plys[3])) == 500
    assert sum(1 for _ in iio.get_reader(tmp_path / "out/flythrough.mp4")) == 5
    assert len(list((tmp_path / "out/renders").glob("view_*.mp4"))) == 4


def _render_args(model, name: str, record) -> list:
    """Wrap ``model.render`` to record ``record(value)`` of its keyword ``name`` at every call
    (None where it is not given)."""
    seen, render = [], model.render

    def spy(*args, **kw):
        value = kw.get(name)
        seen.append(None if value is None else record(value))
        return render(*args, **kw)

    model.render = spy
    return seen


def _backgrounds(model) -> list:
    """The ``background`` of every render (None: the fixed one)."""
    return _render_args(model, "background", lambda b: tuple(b.tolist()))


def test_random_background_only_in_training_and_drawn_from_the_step(tmp_path):
    runs = []
    for run in ("a", "b"):
        L.seed_everything(0)
        model = _fitter(8, random_background=True, coarse_steps=100)
        seen = _backgrounds(model)
        trainer = _trainer(tmp_path / run, 3)
        trainer.fit(model, _dm(tmp_path, init_points=300))
        runs.append(list(seen))
        seen.clear()
        trainer.test(model, _dm(tmp_path, init_points=300), verbose=False)
        assert seen and all(b is None for b in seen)  # evaluation keeps the fixed background
    assert len(runs[0]) == 3 and len(set(runs[0])) == 3  # a new colour every training step
    assert runs[0] == runs[1]  # drawn from (seed, step): a resumed fit composites the same


def _keeps(model) -> list:
    """The DropGaussian mask of every render (None: every Gaussian)."""
    return _render_args(model, "keep", lambda k: k.clone())


def test_gaussian_dropout_only_in_training_and_drawn_from_the_step(tmp_path):
    runs = []
    for run in ("a", "b"):
        L.seed_everything(0)
        model = _fitter(8, gaussian_dropout=0.3, coarse_steps=100)
        seen = _keeps(model)
        trainer = _trainer(tmp_path / run, 3)
        trainer.fit(model, _dm(tmp_path, init_points=300))
        runs.append(list(seen))
        assert len(seen) == 3 and all(k is not None and 0.6 < k.float().mean() < 0.8 for k in seen)
        seen.clear()
        trainer.test(model, _dm(tmp_path, init_points=300), verbose=False)
        assert seen and all(k is None for k in seen)  # evaluation renders every Gaussian
    assert not torch.equal(runs[0][0], runs[0][1])  # a new draw every step ...
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))  # ... from (seed, step)


def test_host_copies_of_the_step_count_and_moving_index_follow_the_state(tmp_path):
    """The step reads a host int for the stage and a cached moving index (a CUDA buffer read or a
    ``nonzero`` is a host sync): densification renews the index, a loaded state renews both."""
    model = _fitter(8, temporal_opacity=True, densify=_budget(3, grow_grad2d=0.0))
    dm = _dm(tmp_path, init_points=300, init_frames="all", split_static=True)
    _trainer(tmp_path, 8).fit(model, dm)
    assert model._steps == int(model.trained_steps) == 8 and model.is_fine
    assert len(model.splats["means"]) > 300  # grown: gsplat's ops replaced the flags' Parameter
    torch.testing.assert_close(model._moving_index(), (model.splats["static"] <= 0.5).nonzero()[:, 0])
    state = model.state_dict()
    state["trained_steps"] = torch.tensor(1)
    state["splats.static"] = torch.ones_like(state["splats.static"])
    model.load_state_dict(state)
    assert not model.is_fine and model._steps == 1
    assert len(model._moving_index()) == 0


def test_a_budget_below_the_initial_gaussians_is_named(tmp_path):
    with pytest.warns(UserWarning, match=r"model.densify.max_gaussians \(100\) is below the 300 initial"):
        _trainer(tmp_path, 1).fit(
            _fitter(1, densify=_budget(40, max_gaussians=100)), _dm(tmp_path, init_points=300)
        )


def test_the_camera_path_is_kept_per_scene_and_size(tmp_path):
    """A regularised step reads the path from the cache (the spline runs on the host); another
    size or a new scene computes it again, to the same values as a fresh fitter's."""
    model, dm = _fitter(2), _dm(tmp_path, init_points=300)
    _trainer(tmp_path, 2).fit(model, dm)
    K, path = model.camera_path()
    assert model.camera_path()[1] is path and model.camera_path(5)[1].shape == (5, 4, 4)
    fresh = _fitter(2)
    fresh.info = model.info
    torch.testing.assert_close(fresh.camera_path(), (K, path))
    model.info = dm.scene_info()  # a new SceneInfo (e.g. set up again)
    assert model.camera_path()[1] is not path
    torch.testing.assert_close(model.camera_path()[1], path)


def test_training_scalars_are_logged_only_on_the_steps_the_logger_writes(tmp_path, monkeypatch):
    """Every ``log_every_n_steps``-th step and the last (self.log costs host time per call, written or
    not); what the logger writes, and the metrics at the end, are those of logging at every step."""
    from lightning.pytorch.loggers import CSVLogger

    import fourdgen.stages.fit as fit_module

    def run(root):
        steps = []
        model = _fitter(7, coarse_steps=2)
        log = model.log

        def counting(name, *a, **k):
            if name == "train/loss":
                steps.append(model.global_step)
            return log(name, *a, **k)

        model.log = counting
        trainer = L.Trainer(
            max_steps=7, log_every_n_steps=3, logger=CSVLogger(root), enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, accelerator="cpu",
            default_root_dir=root,
        )  # fmt: skip
        L.seed_everything(0)
        trainer.fit(model, _dm(tmp_path, init_points=300))
        return steps, trainer.logged_metrics, (Path(trainer.logger.log_dir) / "metrics.csv").read_text()

    steps, metrics, csv = run(tmp_path / "sparse")
    assert steps == [2, 5, 6]  # steps 3 and 6 (1-based) and the last, 7
    assert {"train/loss", "train/psnr", "train/num_gaussians"} <= set(metrics)
    monkeypatch.setattr(fit_module, "logs_this_step", lambda module: True)
    every, metrics_every, csv_every = run(tmp_path / "every")
    assert every == list(range(7))
    assert metrics.keys() == metrics_every.keys()
    # the same rows and columns; values to float noise (the fits are not bit-identical across runs)
    rows, rows_every = ([r.split(",") for r in c.splitlines()] for c in (csv, csv_every))
    assert rows[0] == rows_every[0] and [r[:2] for r in rows] == [r[:2] for r in rows_every]
    for r, e in zip(rows[1:], rows_every[1:], strict=True):
        assert [bool(x) for x in r] == [bool(x) for x in e]
        torch.testing.assert_close(
            torch.tensor([float(x) for x in r if x]),
            torch.tensor([float(x) for x in e if x]),
            rtol=0.05,
            atol=1e-3,
        )
