"""Stage 1b (multi-view grids): DiT installation, zero-init identity, positions, conditioning,
training and outputs on tiny models."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch

from fourdgen.backbones.text import HashTextEncoder
from fourdgen.backbones.wan import build_transformer
from fourdgen.batch import GridBatch
from fourdgen.data.multiview import MultiViewDataModule
from fourdgen.data.synthetic import SyntheticConfig
from fourdgen.nn.grid_coupling import ProjectionGrid, ReferenceGrid
from fourdgen.nn.grid_layout import GridLayout, grid_to_sequence, sequence_to_grid
from fourdgen.nn.grid_views import has_both_references, latent_frames_observed
from fourdgen.nn.multiview import LayoutRotaryPosEmbed, relative_cameras
from fourdgen.stages.grid import GridDiffusion

SYN = SyntheticConfig(
    num_views=4, num_frames=5, height=32, width=32, camera_drift_deg=0, seed=5, layout="arc"
)
WIDE = {"preset": "tiny", "overrides": {"num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 256}}


def _dit(seed=0):
    return build_transformer(preset="tiny", seed=seed).eval()


def _inputs(V=3, Fr=2, h=4, w=4, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, V * Fr, h, w, generator=g)
    text = torch.randn(B, 8, 32, generator=g)
    return x, text


def _dm(tmp_path, **kw):
    kw.setdefault("text_encoder", HashTextEncoder(dim=32, length=8))
    return MultiViewDataModule(
        root=str(tmp_path / "scenes"),
        num_views=3,
        num_frames=5,
        height=32,
        width=32,
        synthetic=SYN,
        crop="center",
        **kw,
    )


def _batch(dm, split="train"):
    dm.prepare_data()
    dm.setup()
    return next(iter(getattr(dm, f"{split}_dataloader")()))


def test_collapsed_positions_reproduce_wan_rope():
    """Frame positions are v * t_max + f; with t_max = F that is Wan's default on the frame-concatenated
    grid, and a larger t_max shifts each view by whole blocks of frames."""
    dit = _dit()
    coupling = ReferenceGrid(mask=["same_view"], t_max=2)
    stock = copy.deepcopy(dit.rope)
    rope = LayoutRotaryPosEmbed(dit.rope, coupling.state)
    x = torch.zeros(1, 16, 6, 8, 8)  # 3 views x 2 frames, 4x4 tokens
    coupling.state.layout = GridLayout(3, 2, 4, 4, t_max=2)
    for a, b in zip(rope(x), stock(x), strict=True):
        torch.testing.assert_close(a, b)
    coupling.state.layout = GridLayout(3, 2, 4, 4, t_max=7)
    cos, _ = rope(x)
    ids = coupling.state.layout.position_ids()
    assert ids[:, 0].unique().tolist() == [0, 1, 7, 8, 14, 15]
    torch.testing.assert_close(cos, rope.gather(ids)[0])
    coupling.state.layout = None
    torch.testing.assert_close(rope(x)[0], stock(x)[0])  # outside grid calls: Wan's default


def _per_view(stock, x, timestep, text, V, patch=(1, 2, 2)):
    """The stock DiT on each view alone (the per-video model the grid starts from)."""
    outs = []
    for v in range(V):
        xv = sequence_to_grid(x, V)[:, v]
        tv = timestep
        if timestep.ndim == 2:
            n = timestep.shape[1] // V
            tv = timestep[:, v * n : (v + 1) * n]
        outs.append(stock(hidden_states=xv, timestep=tv, encoder_hidden_states=text, return_dict=False)[0])
    return grid_to_sequence(torch.stack(outs, 1))


def test_reference_grid_with_same_view_mask_is_the_per_video_model():
    """Processor, RoPE and reference embedding reproduce the stock DiT per view (no reference given);
    the fused view-time mask then changes the output (views exchange information)."""
    stock = _dit()
    x, text = _inputs()
    t = torch.tensor([500.0, 300.0])
    ref = _per_view(stock, x, t, text, V=3)
    for terms in (["same_view"], ["same_view", "same_time"]):
        coupling = ReferenceGrid(mask=terms, t_max=21)
        dit = coupling.install(copy.deepcopy(stock))
        inp = coupling.prepare(_fake_batch(B=2, V=3, T=5), sequence_to_grid(x, 3), encode=None, t_factor=4)
        inp.reference = torch.zeros_like(x)
        out = coupling.predict(dit, x, inp, t, text, None)
        if terms == ["same_view"]:
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        else:
            assert (out - ref).abs().max() > 1e-3


def test_projection_grid_is_the_per_video_model_at_init():
    """Full-4D's fused branch and camera encoders are zero-initialised: at init each view is the
    stock model on [target | condition] frames (condition tokens at timestep 0)."""
    stock = _dit()
    x, text = _inputs(V=3, Fr=2)
    cond = torch.randn_like(x)
    coupling = ProjectionGrid(t_max=21)
    dit = coupling.install(copy.deepcopy(stock))
    assert {n.split(".")[-2] for n, _ in dit.named_parameters() if "camera_encoder" in n} == {
        "camera_encoder"
    }
    from fourdgen.nn.grid_coupling import GridInputs

    inp = GridInputs(x0=x, views=3, cond=cond, camera=torch.randn(2, 3, 12))
    t = torch.tensor([500.0, 300.0])
    out = coupling.predict(dit, x, inp, t, text, None)
    both = grid_to_sequence(torch.cat([sequence_to_grid(x, 3), sequence_to_grid(cond, 3)], dim=3))
    per_frame = torch.cat([torch.ones(2), torch.zeros(2)]).repeat(3)
    ts = (t[:, None] * per_frame).repeat_interleave(4, dim=1)
    ref = _per_view(stock, both, ts, text, V=3)
    ref = grid_to_sequence(sequence_to_grid(ref, 3)[:, :, :, :2])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # Trained a little (non-zero projection / camera), the fused branch and cameras act.
    for block in dit.blocks:
        torch.nn.init.normal_(block.fused_proj.weight, std=0.02)
        torch.nn.init.normal_(block.camera_encoder.weight, std=0.02)
    assert (coupling.predict(dit, x, inp, t, text, None) - ref).abs().max() > 1e-3


def _fake_batch(B=2, V=3, T=5, H=16, W=16, condition="first_view+first_time"):
    observed = torch.zeros(B, V, T, dtype=torch.bool)
    if "first_view" in condition:
        observed[:, 0] = True
    if "first_time" in condition:
        observed[:, :, 0] = True
    return GridBatch(
        rgb=torch.zeros(B, V, T, 3, H, W),
        K=torch.eye(3).expand(B, V, 3, 3),
        w2c=torch.eye(4).expand(B, V, T, 4, 4),
        observed=observed,
        times=torch.zeros(B, T),
        view_ids=torch.arange(V).expand(B, V),
        time_ids=torch.arange(T).expand(B, T),
    )


def test_reference_cells_and_latent_frames():
    obs = torch.zeros(1, 2, 9, dtype=torch.bool)
    obs[0, 0] = True  # fixed-view row
    obs[0, :, 0] = True  # freeze-time column
    obs[0, 1, 1:4] = True  # 3 of latent frame 1's 4 pixel frames: not a whole latent frame
    lat = latent_frames_observed(obs, 4)
    assert lat.tolist() == [[[True, True, True], [True, False, False]]]
    coupling = ReferenceGrid()
    b = _fake_batch(B=1, V=2, T=9)
    latents = torch.randn(1, 2, 16, 3, 2, 2)
    inp = coupling.prepare(b, latents, None, 4)
    known = inp.known[0, 0, :, 0, 0].tolist()
    assert known == [True, True, True, True, False, False]  # view 0: all; view 1: frame 0
    assert torch.equal(inp.loss_mask.bool(), ~inp.known)
    ref = sequence_to_grid(inp.reference, 2)
    assert torch.equal(ref[0, 0], latents[0, 0]) and torch.equal(ref[0, 1, :, 0], latents[0, 1, :, 0])
    assert ref[0, 1, :, 1:].abs().sum() == 0


def test_both_references_detection():
    obs = torch.zeros(4, 3, 5, dtype=torch.bool)
    obs[0, 0], obs[0, :, 0] = True, True  # fixed-view row + freeze-time column
    obs[1, 0] = True  # the row only
    obs[2, :, 0] = True  # the column only
    obs[3, 2], obs[3, :, 4] = True, True  # another row and column: still both videos
    assert has_both_references(obs).tolist() == [True, False, False, True]
    assert not has_both_references(torch.ones(1, 1, 5, dtype=torch.bool)).any()  # a monocular clip


def _reference_batch(B=2, V=3, T=5, condition="first_view+first_time"):
    """A small grid whose rows are traceable: ``rgb[:, v]`` holds v / V, ``view_ids`` = 0..V-1."""
    b = _fake_batch(B=B, V=V, T=T, H=8, W=8, condition=condition)
    rgb = (torch.arange(V).float() / V)[None, :, None, None, None, None].expand(B, V, T, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    return dataclasses.replace(
        b, rgb=rgb + 0.01 * torch.rand(rgb.shape, generator=g), text_embeds=torch.randn(B, 8, 32, generator=g)
    ).validate()


def test_reference_grid_reverses_the_view_order_at_random():
    """Appendix B: views reversed at random (p = 0.5 by default) in training; every per-view field
    moves with its row (reference: ``flip`` along the view axis), the reference cells stay put."""
    b = _reference_batch(B=200)
    torch.manual_seed(0)
    out = ReferenceGrid().training_batch(b)
    flipped = out.view_ids[:, 0] == 2
    assert 0.4 < flipped.float().mean() < 0.6
    for i in range(b.shape[0]):
        want = b.rgb[i].flip(0) if flipped[i] else b.rgb[i]
        assert torch.equal(out.rgb[i], want)
        assert out.view_ids[i].tolist() == ([2, 1, 0] if flipped[i] else [0, 1, 2])
    assert torch.equal(out.observed, b.observed) and torch.equal(out.time_ids, b.time_ids)
    torch.manual_seed(0)
    assert torch.equal(ReferenceGrid().training_batch(b).view_ids, out.view_ids)  # the global seed
    assert torch.equal(ReferenceGrid(reverse_views=1.0).training_batch(b).rgb, b.rgb.flip(1))
    assert ReferenceGrid(reverse_views=0.0).training_batch(b) is b
    with pytest.raises(ValueError, match="probability"):
        ReferenceGrid(reverse_views=1.5)


@pytest.mark.parametrize(
    "conditions, cfg_with_both, guided",
    [
        (["first_view+first_time"], False, False),  # appendix B: no CFG with both references
        (["first_view+first_time"], True, True),  # the option keeps it
        (["first_view"], False, True),  # one reference video: CFG
        (["first_view+first_time", "first_view"], False, True),  # a mixed batch keeps it
    ],
)
def test_cfg_is_off_by_default_when_both_reference_videos_are_given(conditions, cfg_with_both, guided):
    model = GridDiffusion(
        coupling=ReferenceGrid(cfg_with_both_references=cfg_with_both), guidance_scale=5.0, lpips_net=None
    )
    model.configure_model()
    parts = [_reference_batch(B=1, condition=c) for c in conditions]
    b = GridBatch.collate(parts) if len(parts) > 1 else parts[0]
    calls = []
    velocity = model.velocity
    model.velocity = lambda *a: calls.append(1) or velocity(*a)

    def run(**kw):
        return model.sample(b, num_steps=2, generator=torch.Generator().manual_seed(0), **kw)

    x = run()
    assert len(calls) == (4 if guided else 2)  # 2 steps, 1 or 2 DiT calls each
    torch.testing.assert_close(x, run(guidance_scale=5.0 if guided else 1.0), atol=0, rtol=0)
    if not guided:
        assert not torch.equal(x, run(guidance_scale=5.0))  # the scale would have mattered


def test_projection_condition_and_cameras(tmp_path):
    """The source view's depth, rendered into its own camera, is the source video; into another view
    it matches that view's ground truth where the point cloud covers it."""
    torch.manual_seed(0)  # training grids draw random views; some pairs barely overlap
    b = GridBatch.coerce(_batch(_dm(tmp_path, condition="first_view")))
    img = ProjectionGrid(radius_px=0).project(b)  # [B, V, T, 3, H, W]
    assert img.shape == b.rgb.shape
    torch.testing.assert_close(img[:, 0], b.rgb[:, 0], atol=1e-5, rtol=0)
    covered = (img[:, 1] > -1).any(2, keepdim=True).expand_as(img[:, 1])
    assert covered.float().mean() > 0.3
    assert (ProjectionGrid(radius_px=1).project(b)[:, 1] > -1).float().mean() > covered.float().mean()
    err = (img[:, 1] - b.rgb[:, 1]).abs()[covered].median()
    unmoved = (b.rgb[:, 0] - b.rgb[:, 1]).abs()[covered].median()  # the source frame as is
    assert err < 0.2 * unmoved, (err, unmoved)
    cams = relative_cameras(b.w2c[:, :, 0])
    torch.testing.assert_close(
        cams[:, 0], torch.eye(4)[:3].flatten().expand(b.shape[0], 12), atol=1e-5, rtol=0
    )


def test_progressive_clip_schedule_crops_training_clips(tmp_path):
    model = GridDiffusion(clip_schedule={0: 1, 100: 5}, lpips_net=None)
    b = GridBatch.coerce(_batch(_dm(tmp_path)))
    assert model.clip_frames(0) == 1 and model.clip_frames(99) == 1 and model.clip_frames(100) == 5
    short = model.crop(b, model.clip_frames(0))
    assert short.shape[2] == 1 and short.w2c.shape[2] == 1 and short.times.shape[1] == 1
    assert model.crop(b, 5) is b


def _trainer(tmp_path, steps, **kw):
    kw.setdefault("limit_val_batches", 0)
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **kw,
    )


@pytest.mark.slow
@pytest.mark.parametrize("coupling", ["reference", "projection"])
def test_tiny_grid_model_learns(tmp_path, coupling):
    """A tiny DiT learns one synthetic grid: the generated cells' latent error and PSNR improve.
    PSNR is taken against the VAE's reconstruction of the ground truth: the tiny VAE is random, so
    pixels would score the VAE rather than the DiT."""
    torch.manual_seed(0)
    cond = "first_view+first_time" if coupling == "reference" else "first_view"
    dm = _dm(tmp_path, condition=cond, samples_per_scene=200)
    model = GridDiffusion(
        transformer=WIDE,
        coupling=ReferenceGrid() if coupling == "reference" else ProjectionGrid(),
        lr=1e-3,
        warmup_steps=10,
        guidance_scale=1.0,
        val_sample_steps=10,
        lpips_net=None,
    )
    dm.prepare_data()
    dm.setup()
    b = GridBatch.coerce(next(iter(dm.val_dataloader())))

    def evaluate():
        model.eval()
        with torch.no_grad():
            inp = model.prepare(b)
            x = model.sample(b, num_steps=10, generator=torch.Generator().manual_seed(0), inp=inp)
            gen = inp.loss_mask if inp.loss_mask is not None else torch.ones_like(x[:, :1])
            err = (((x - inp.x0) ** 2) * gen).sum() / (gen.expand_as(x).sum() * 1.0)
            target = GridBatch(**{**vars(b), "rgb": model.decode_grid(inp.x0, inp.views)})
            psnr = model.score(model.decode_grid(x, inp.views), target)["psnr"]
        model.train()
        return float(err), float(psnr)

    trainer = _trainer(tmp_path, 250)
    trainer.strategy.connect(model)
    model.configure_model()
    before = evaluate()
    trainer.fit(model, dm)
    after = evaluate()
    print(f"{coupling}: latent mse {before[0]:.3f} -> {after[0]:.3f}, psnr {before[1]:.2f} -> {after[1]:.2f}")
    assert after[0] < 0.5 * before[0]
    assert after[1] > before[1] + 2.0


def test_grid_mosaic_and_writer(tmp_path):
    from fourdgen.callbacks.grid import GridVideoWriter, grid_mosaic
    from fourdgen.data.scene import read_scene

    rgb = torch.rand(3, 2, 3, 4, 6)  # 3 views -> 2 x 2 tiles, one black
    m = grid_mosaic(rgb)
    assert m.shape == (2, 8, 12, 3)
    torch.testing.assert_close(m[:, 4:, :6], rgb[2].permute(0, 2, 3, 1))
    assert m[:, 4:, 6:].abs().sum() == 0
    clip = {
        "scene_id": "g",
        "rgb": rgb * 2 - 1,
        "K": None,
        "w2c": None,
        "observed": torch.ones(3, 2, dtype=torch.bool),
    }
    writer = GridVideoWriter(out_dir=str(tmp_path / "out"))
    writer.write_on_batch_end(None, None, [clip], None, None, 0)
    out = tmp_path / "out" / "g"
    assert (out / "mosaic.mp4").is_file() and (out / "views" / "view_02.mp4").is_file()
    scene = read_scene(out / "scene")
    assert scene.num_views == 3 and scene.num_frames == 2
    got = scene.load_rgb(1)  # [T, 3, H, W] in [0, 1]
    torch.testing.assert_close(got, rgb[1], atol=1 / 255, rtol=0)
    K = torch.tensor([[5.0, 0, 3], [0, 5.0, 2], [0, 0, 1]]).expand(3, 3, 3)
    w2c = torch.eye(4).expand(3, 2, 4, 4).clone()
    w2c[:, :, 0, 3] = 1.5
    from fourdgen.callbacks.grid import write_grid

    write_grid({**clip, "scene_id": "h", "K": K, "w2c": w2c}, tmp_path / "out")
    scene = read_scene(tmp_path / "out" / "h" / "scene")
    torch.testing.assert_close(scene.w2c.float(), w2c)
    with pytest.raises(ValueError, match="'w2c'"):
        write_grid({**clip, "K": K, "w2c": w2c[:, :1]}, tmp_path / "bad")
    with pytest.raises(ValueError, match="'rgb'"):
        write_grid({**clip, "rgb": rgb[0]}, tmp_path / "bad")


@pytest.mark.parametrize("recipe", ["4real_v2", "full4d"])
def test_tiny_grid_recipes_fit_and_predict_through_the_cli(tmp_path, recipe):
    import json

    from fourdgen.cli import FourDGenCLI
    from fourdgen.data.scene import read_scene

    common = [
        f"--config=lightning_configs/tiny/{recipe}.yaml",
        f"--data.init_args.root={tmp_path / 'scenes'}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks="
        + json.dumps(
            [
                {
                    "class_path": "fourdgen.callbacks.grid.GridVideoWriter",
                    "init_args": {"out_dir": str(tmp_path / "pred")},
                },
                {
                    "class_path": "fourdgen.callbacks.checkpoint.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ck"), "save_last": True},
                },
            ]
        ),
    ]
    FourDGenCLI(
        args=[
            "fit",
            *common,
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.val_check_interval=2",
        ]
    )
    last = tmp_path / "ck" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2  # the final state is saved
    FourDGenCLI(args=["predict", *common, "--model.init_args.sample_steps=2", f"--ckpt_path={last}"])
    scenes = sorted(p for p in (tmp_path / "pred").iterdir() if p.is_dir())
    assert scenes, "predict wrote no grid"
    scene = read_scene(scenes[0] / "scene")
    assert scene.num_views == 3 and scene.num_frames == 5
    meta = json.loads((scenes[0] / "scene" / "scene.json").read_text())
    assert (meta.get("cameras") == "unknown") == (recipe == "4real_v2")


def test_4real_v2_recipes_follow_appendix_b():
    """Both 4Real-Video-V2 recipes carry appendix B's settings; the GPU one its numbers."""
    import yaml

    from fourdgen.components import build

    for name in ("video", "tiny"):
        cfg = yaml.safe_load(Path(f"lightning_configs/{name}/4real_v2.yaml").read_text())
        data, model = cfg["data"]["init_args"], cfg["model"]["init_args"]
        assert data["mix"] == [0.4, 0.2, 0.2, 0.2] and data["static_condition"] == "none", name
        assert model.get("clip_schedule") is None and data["clip_schedule"], name  # the data's schedule
        coupling = build(model["coupling"])
        assert isinstance(coupling, ReferenceGrid) and coupling.reverse_views == 0.5, name
        assert coupling.cfg_with_both_references is False, name
    assert data["clip_schedule"] == {0: 5, 200: 9} and data["synthetic"]["num_frames"] == 9  # the tiny twin
    gpu = yaml.safe_load(Path("lightning_configs/video/4real_v2.yaml").read_text())
    data = gpu["data"]["init_args"]
    assert data["clip_schedule"] == {0: 29, 4000: 61} and gpu["trainer"]["max_steps"] == 6000
    assert (data["num_views"], data["num_frames"], data["height"], data["width"]) == (8, 29, 144, 256)
