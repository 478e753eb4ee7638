"""One4D Decoupled LoRA Control: identity at init, disjoint branches, gradient routing under
gradient checkpointing, control links, and the per-branch export in diffusers' LoRA format."""

from __future__ import annotations

import copy

import pytest
import torch

from fourdgen.backbones.wan import build_transformer
from fourdgen.nn.decoupled_lora import (
    branch_state,
    default_link_layers,
    dit_linears,
    install_dlc,
    split_branches,
    stack_branches,
)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randn(1, 16, 2, 4, 4, generator=g)
    xyz = torch.randn(1, 16, 2, 4, 4, generator=g)
    text = torch.randn(1, 5, 32, generator=g)
    return rgb, xyz, text


def _run(model, rgb, xyz, text):
    out = model(
        hidden_states=stack_branches(rgb, xyz),
        timestep=torch.tensor([400.0, 400.0]),
        encoder_hidden_states=torch.cat([text, text]),
        return_dict=False,
    )[0]
    return split_branches(out)


def _dlc(link_layers=(0, 1)):
    torch.manual_seed(0)
    base = build_transformer(preset="tiny")
    return base, install_dlc(copy.deepcopy(base), rank=4, alpha=4, link_layers=link_layers)


def _perturb(model, key):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name:
                p.normal_(0, 0.2)


def test_at_init_both_branches_equal_the_base_model_exactly():
    base, dlc = _dlc()
    rgb, xyz, text = _inputs()
    ref = split_branches(
        base(
            hidden_states=stack_branches(rgb, xyz),
            timestep=torch.tensor([400.0, 400.0]),
            encoder_hidden_states=torch.cat([text, text]),
            return_dict=False,
        )[0]
    )
    got = _run(dlc, rgb, xyz, text)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    trainable = [n for n, p in dlc.named_parameters() if p.requires_grad]
    assert trainable and all(".dlc." in n or "dlc_link." in n for n in trainable)
    assert set(base.state_dict()) <= set(dlc.state_dict())  # stock keys kept: pretrained weights load


def test_branches_are_disjoint_until_links_learn():
    _, dlc = _dlc()
    _perturb(dlc, "lora_B_")  # trained adapters, links still zero
    rgb, xyz, text = _inputs()
    xyz_in = xyz.clone().requires_grad_(True)
    out_rgb, _ = _run(dlc, rgb, xyz_in, text)
    (g,) = torch.autograd.grad(out_rgb.sum(), xyz_in, allow_unused=True)
    assert g is None or g.abs().max() == 0  # no attention or anything else between branches
    _perturb(dlc, "dlc_link.")
    xyz_in = xyz.clone().requires_grad_(True)
    out_rgb, _ = _run(dlc, rgb, xyz_in, text)
    (g,) = torch.autograd.grad(out_rgb.sum(), xyz_in)
    assert g.abs().max() > 0  # the links carry information across


@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_branch_gradient_reaches_only_its_adapters(checkpointing):
    _, dlc = _dlc()
    _perturb(dlc, "lora_B_")
    if checkpointing:
        dlc.enable_gradient_checkpointing()
    dlc.train()
    rgb, xyz, text = _inputs()
    grads = {}
    for branch in ("rgb", "xyz"):
        dlc.zero_grad(set_to_none=True)
        out = dict(zip(("rgb", "xyz"), _run(dlc, rgb, xyz, text), strict=True))
        out[branch].square().mean().backward()
        for other in ("rgb", "xyz"):
            norm = sum(
                float(p.grad.abs().sum())
                for n, p in dlc.named_parameters()
                if f"_{other}." in n and ".dlc." in n and p.grad is not None
            )
            grads[(branch, other)] = norm
    assert grads[("rgb", "rgb")] > 0 and grads[("xyz", "xyz")] > 0
    assert grads[("rgb", "xyz")] == 0 and grads[("xyz", "rgb")] == 0


def test_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        _, dlc = _dlc()
        _perturb(dlc, "lora_B_")
        _perturb(dlc, "dlc_link.")
        if checkpointing:
            dlc.enable_gradient_checkpointing()
        dlc.train()
        out_rgb, out_xyz = _run(dlc, *_inputs())
        (out_rgb.square().mean() + out_xyz.abs().mean()).backward()
        return {n: p.grad.clone() for n, p in dlc.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_rgb_branch_export_loads_into_stock_diffusers():
    base, dlc = _dlc()
    _perturb(dlc, "lora_B_")
    rgb, xyz, text = _inputs()
    ours, _ = _run(dlc, rgb, xyz, text)
    stock = copy.deepcopy(base)
    rank = 4
    stock.load_lora_adapter(
        {f"transformer.{k}": v for k, v in branch_state(dlc, "rgb").items()},
        adapter_name="rgb",
        prefix="transformer",
        network_alphas={f"transformer.{k}": float(rank) for k in branch_state(dlc, "rgb") if "lora_A" in k},
    )
    ref, _ = _run(stock, rgb, xyz, text)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert len(branch_state(dlc, "xyz")) == 2 * len(dit_linears(base))
    assert len(dit_linears(base, "all")) > len(dit_linears(base))


def test_paper_parameter_counts():
    """One4D: 685M LoRA parameters (rank 64, both branches) and 250.7M in five control links, in
    units of 2^20; on Wan-14B-I2V's shapes (meta device, no memory)."""
    model = install_dlc(
        build_transformer(preset="14b-i2v"), rank=64, alpha=64, link_layers=default_link_layers(40)
    )
    lora = sum(p.numel() for n, p in model.named_parameters() if ".dlc." in n) / 2**20
    links = sum(p.numel() for n, p in model.named_parameters() if "dlc_link." in n) / 2**20
    assert round(lora) == 685 and abs(links - 250.7) < 1.0, (lora, links)


def test_link_layers_are_validated_and_spread():
    assert default_link_layers(40) == (0, 10, 20, 29, 39)
    assert default_link_layers(2, 5) == (0, 1)
    with pytest.raises(ValueError, match="outside"):
        _dlc(link_layers=(7,))


def test_unified_masked_conditioning_tasks():
    from fourdgen.backbones.wan import build_vae
    from fourdgen.diffusion.conditioning import MaskedFrames

    umc = MaskedFrames(seed=0)
    T = 9
    image, video = umc.sample(1, T, "image")[0], umc.sample(1, T, "video")[0]
    assert image.tolist() == [True] + [False] * 8 and video.all()
    for _ in range(20):
        sparse = umc.sample(1, T, "sparse")[0]
        assert sparse[0] and 2 <= int(sparse.sum()) <= T - 1
    draws = umc.sample(2000, T)
    share = (
        torch.stack([draws.sum(1) == 1, (draws.sum(1) > 1) & (draws.sum(1) < T), draws.all(1)])
        .float()
        .mean(1)
    )
    torch.testing.assert_close(share, torch.tensor([0.35, 0.30, 0.35]), atol=0.04, rtol=0)

    rgb = torch.rand(2, 3, T, 8, 8) * 2 - 1
    obs = torch.stack([image, sparse])
    video_in = umc.condition_video(rgb, obs)
    for i in range(2):
        for t in range(T):
            expect = rgb[i, :, t] if obs[i, t] else torch.zeros_like(rgb[i, :, t])
            torch.testing.assert_close(video_in[i, :, t], expect, rtol=0, atol=0)
    # Mask at latent resolution, Wan-inpainting packing: frame 0 x4, then frames 4k-3..4k.
    m = umc.mask(obs, 4, (2, 3))
    assert m.shape == (2, 4, 3, 2, 3)
    assert (m[0, :, 0] == 1).all() and (m[0, :, 1:] == 0).all()
    packed = torch.cat([obs[1, :1].expand(4), obs[1, 1:]]).float().view(3, 4).T
    torch.testing.assert_close(m[1, :, :, 0, 0], packed)
    vae = build_vae(preset="tiny")
    extra = umc(torch.randn(2, 16, 5, 4, 4), vae, torch.ones(2, 9, dtype=torch.bool))
    assert extra.shape == (2, 2 + 16, 5, 4, 4)


def test_dlc_coupling_in_the_stage_module(tmp_path):
    """One4D's components in VideoDiffusion: only DLC tensors train, the XYZ branch gets no
    condition at init, and a training step runs."""
    from fourdgen.diffusion.conditioning import MaskedFrames
    from fourdgen.nn.decoupled_lora import DecoupledLoRAControl
    from fourdgen.stages.video import VideoDiffusion
    from tests.test_video import _batch, _dm, _trainer

    model = VideoDiffusion(
        coupling=DecoupledLoRAControl(rank=4, num_links=2), conditioning=MaskedFrames(seed=0)
    )
    model.configure_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".dlc." in n or "dlc_link." in n for n in trainable)
    dm = _dm(tmp_path, samples_per_scene=2)
    b = _batch(dm)
    model.eval()
    lat = model.encode(b)
    x = torch.randn_like(model.coupling.fuse(lat["rgb"], lat["xyz"]))
    t = torch.tensor([500.0])
    _, v_xyz = model.coupling.split(model.velocity(x, lat["cond"], t, b.text_embeds, None))
    _, v_xyz2 = model.coupling.split(model.velocity(x, lat["cond"] + 1, t, b.text_embeds, None))
    torch.testing.assert_close(v_xyz, v_xyz2, rtol=0, atol=0)  # conditions reach XYZ only via links
    model.train()
    trainer = _trainer(tmp_path, 2)
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_export_round_trip_and_stock_load(tmp_path):
    from fourdgen.nn.decoupled_lora import load_dlc, save_dlc
    from fourdgen.nn.lora import EXTRA_FILE, LORA_FILE

    base = build_transformer(preset="tiny")
    dlc = install_dlc(copy.deepcopy(base), rank=4, alpha=8, link_layers=(1,))
    _perturb(dlc, "lora_B_")
    _perturb(dlc, "dlc_link.")
    save_dlc(dlc, tmp_path / "export")
    for f in ("rgb/" + LORA_FILE, "xyz/" + LORA_FILE, EXTRA_FILE):
        assert (tmp_path / "export" / f).is_file(), f
    fresh = load_dlc(install_dlc(copy.deepcopy(base), rank=4, alpha=8, link_layers=(1,)), tmp_path / "export")
    inputs = _inputs()
    for g, r in zip(_run(fresh, *inputs), _run(dlc, *inputs), strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    # The RGB adapter alone in a stock diffusers model = the RGB branch without links.
    no_links = install_dlc(copy.deepcopy(base), rank=4, alpha=8, link_layers=())
    stock = copy.deepcopy(base)
    stock.load_lora_adapter(str(tmp_path / "export" / "rgb"), weight_name=LORA_FILE, prefix="transformer")
    with torch.no_grad():
        for name, m in no_links.named_modules():
            if hasattr(m, "dlc"):
                src = dict(dlc.named_modules())[name].dlc
                m.dlc.load_state_dict(src.state_dict())
    torch.testing.assert_close(_run(stock, *inputs)[0], _run(no_links, *inputs)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # convergence test: in the default suite, deselect with -m 'not slow'
def test_tiny_one4d_model_learns_a_clip_for_each_task(tmp_path):
    """LoRA-only DLC + UMC trained on one clip (tasks drawn 0.35/0.30/0.35): sampling with a single
    image, sparse frames or the full video as condition lands near the clip's latents; the
    untrained model does not. (A random tiny base is a poor prior, so LoRA learns slowly: the bar is
    a >10x drop, not reproduction; see the closing note of the One4D issue.)"""
    import dataclasses

    from fourdgen.diffusion.conditioning import MaskedFrames
    from fourdgen.nn.decoupled_lora import DecoupledLoRAControl
    from fourdgen.stages.video import VideoDiffusion
    from tests.test_video import WIDE, _batch, _dm, _trainer

    torch.manual_seed(0)
    dm = _dm(tmp_path, samples_per_scene=600)
    b = _batch(dm)
    model = VideoDiffusion(
        transformer=WIDE,
        coupling=DecoupledLoRAControl(rank=64, num_links=2, targets="all"),
        conditioning=MaskedFrames(seed=0),
        lr=1e-3,
        warmup_steps=20,
    )
    model.configure_model()

    def errors():
        model.eval()
        out = {}
        for task in ("image", "sparse", "video"):
            obs = MaskedFrames(seed=1).sample(1, 5, task)
            bb = dataclasses.replace(b, observed=obs[:, None])
            lat = model.encode(bb)
            x0 = model.coupling.fuse(lat["rgb"], lat["xyz"])
            s = model.sample(bb, num_steps=20, guidance_scale=1.0, generator=torch.Generator().manual_seed(1))
            out[task] = float(((s - x0) ** 2).mean() / (x0**2).mean())
        return out

    before = errors()
    model.train()
    _trainer(tmp_path, 600).fit(model, dm)
    after = errors()
    print("one4d learning", before, after)
    for task in before:
        assert after[task] < before[task] / 10 and after[task] < 0.8, (task, before, after)


@pytest.mark.parametrize("observe", ["first", [0, 2, 4], "all"])
def test_one4d_validation_post_optimises_each_task(tmp_path, observe):
    """Generation, mixed and reconstruction: the DataModule marks the given frames, UMC conditions on
    them, and validation recovers cameras and depth from the generated pointmaps."""
    from fourdgen.diffusion.conditioning import MaskedFrames
    from fourdgen.nn.decoupled_lora import DecoupledLoRAControl
    from fourdgen.stages.video import VideoDiffusion
    from tests.test_video import WIDE, _dm, _trainer

    dm = _dm(tmp_path, cache=False, observe=observe)
    dm.prepare_data()
    dm.setup()
    b = next(iter(dm.val_dataloader()))
    expect = observe if isinstance(observe, list) else {"first": [0], "all": [0, 1, 2, 3, 4]}[observe]
    assert b.observed[0, 0].nonzero().flatten().tolist() == expect
    model = VideoDiffusion(
        transformer=WIDE,
        coupling=DecoupledLoRAControl(rank=4, num_links=2),
        conditioning=MaskedFrames(),
        val_sample_steps=2,
        val_postopt_steps=5,
    )
    model.configure_model()
    torch.testing.assert_close(model.conditioning.observed(b), b.observed[:, 0])
    metrics = _trainer(tmp_path, 1, limit_val_batches=1).validate(model, dm, verbose=False)[0]
    for k in ("val/latent_mse", "val/abs_rel", "val/delta1", "val/ate"):
        assert k in metrics and metrics[k] == metrics[k], k


def test_observe_is_validated(tmp_path):
    from tests.test_video import _dm

    with pytest.raises(ValueError, match="data.observe"):
        _dm(tmp_path, observe="some")
    dm = _dm(tmp_path, cache=False, observe=[0, 9])
    dm.prepare_data()
    dm.setup()
    with pytest.raises(ValueError, match="outside the clip"):
        next(iter(dm.val_dataloader()))
