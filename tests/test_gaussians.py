"""Tests of fourdgen.gaussians: container, torch rasterizer vs gsplat's torch reference, PLY, strategy."""

from __future__ import annotations

import importlib
import itertools
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from gsplat.cuda import _torch_impl as gref
from gsplat.strategy import DefaultStrategy
from plyfile import PlyData, PlyElement

from fourdgen.gaussians import (
    Gaussians,
    knn_mean_distance,
    load_ply,
    project_gaussians,
    rasterize,
    rgb_to_sh0,
    save_ply,
    save_ply_sequence,
    sh0_to_rgb,
)
from fourdgen.gaussians.bounds import camera_extent, foreground_bounds
from fourdgen.gaussians.densify import BudgetStrategy
from fourdgen.gaussians.dropout import dropped_logits, keep_mask
from fourdgen.gaussians.losses import add_hexplane_regularization, inverse_depth_l1, photometric_loss
from fourdgen.gaussians.optim import LearningRates, exp_decay
from fourdgen.geometry.cameras import look_at, make_intrinsics
from fourdgen.metrics.image import ssim


@pytest.fixture(autouse=True)
def _one_thread():
    # On a shared 2-core box, 2 intra-op threads run ~10-25x slower whenever another process is busy
    # (each parallel op waits for a descheduled worker); one thread keeps these tests ~2 s each.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- reference


def reference_render(g: Gaussians, K, w2c, W, H, bg, sh_degree, eps2d=0.3, near=0.01, tile=16):
    """gsplat's pure-torch path: ``_fully_fused_projection`` + SH + ``_isect_tiles`` /
    ``_isect_offset_encode``, then compositing that transcribes gsplat's CUDA forward kernel
    (``RasterizeToPixels3DGSFwd.cu``) pixel-vectorised, one Gaussian at a time.
    (``_torch_impl._rasterize_to_pixels`` itself calls a CUDA kernel and needs nerfacc.)"""
    C, N = w2c.shape[0], g.num
    covars, _ = gref._quat_scale_to_covar_preci(g.quats, g.scales, compute_preci=False)
    radii, means2d, depths, conics, _ = gref._fully_fused_projection(
        g.means, covars, w2c, K, W, H, eps2d, near
    )
    dirs = g.means[None] - torch.inverse(w2c)[:, None, :3, 3]
    rgb = gref._spherical_harmonics(sh_degree, dirs, g.sh.expand(C, N, -1, 3)).add(0.5).clamp_min(0.0)
    feats = torch.cat([rgb, depths[..., None]], -1)  # RGB+ED
    opac = g.opacities
    tw, th = math.ceil(W / tile), math.ceil(H / tile)
    _, isect_ids, flatten_ids = gref._isect_tiles(means2d, radii, depths, tile, tw, th)
    offsets = gref._isect_offset_encode(isect_ids, C, tw, th).flatten().tolist() + [len(flatten_ids)]
    ids = flatten_ids.tolist()
    m2, con, f = means2d.reshape(-1, 2), conics.reshape(-1, 3), feats.reshape(-1, 4)
    out = torch.zeros(C, th * tile, tw * tile, 5)
    for c, ty, tx in itertools.product(range(C), range(th), range(tw)):
        t = (c * th + ty) * tw + tx
        ys, xs = slice(ty * tile, (ty + 1) * tile), slice(tx * tile, (tx + 1) * tile)
        u = torch.arange(tile) + 0.5
        py, px = torch.meshgrid(u + ys.start, u + xs.start, indexing="ij")
        T, acc = torch.ones(tile, tile), torch.zeros(tile, tile, 4)
        done = torch.zeros(tile, tile, dtype=torch.bool)
        for gid in ids[offsets[t] : offsets[t + 1]]:
            dx, dy = m2[gid, 0] - px, m2[gid, 1] - py
            sigma = 0.5 * (con[gid, 0] * dx * dx + con[gid, 2] * dy * dy) + con[gid, 1] * dx * dy
            alpha = torch.clamp_max(opac[gid % N] * torch.exp(-sigma), 0.999)
            skip = done | (sigma < 0) | (alpha < 1.0 / 255.0)
            next_T = T * (1.0 - alpha)
            use = ~skip & (next_T > 1e-4)
            done = done | (~skip & (next_T <= 1e-4))
            acc = acc + torch.where(use, alpha * T, 0.0)[..., None] * f[gid]
            T = torch.where(use, next_T, T)
        out[c, ys, xs] = torch.cat([acc, T[..., None]], -1)
    out = out[:, :H, :W]
    T = out[..., 4:]
    alpha = 1.0 - T
    rgb = out[..., :3] + T * bg[:, None, None, :]
    depth = out[..., 3:4] / alpha.clamp_min(1e-10)
    return rgb, alpha, depth, radii


def random_scene(seed, n=150, sh_degree=0, n_behind=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    means = (r(n, 3) * 2 - 1) * torch.tensor([1.2, 0.8, 0.8])
    opacity = 0.05 + 0.94 * r(n)
    # a third are near-opaque and packed together: exercises the T <= 1e-4 stop
    k = n // 3
    means[:k] *= 0.3
    opacity[:k] = 0.97 + 0.0299 * r(k)
    g = Gaussians(
        means=means,
        log_scales=torch.log(0.02 + 0.2 * r(n, 3) ** 2),
        quats=torch.randn(n, 4, generator=gen),
        opacity_logits=torch.logit(opacity),
        sh0=rgb_to_sh0(r(n, 1, 3)),
        shN=0.3 * torch.randn(n, (sh_degree + 1) ** 2 - 1, 3, generator=gen),
    )
    # two large, fully opaque splats at the back: alpha hits the 0.999 clamp around their centres
    g.means[-2:] = torch.tensor([[0.2, 0.1, 1.0], [-0.3, -0.2, 1.2]])
    g.log_scales[-2:] = math.log(0.8)
    g.opacity_logits[-2:] = 14.0
    eyes = torch.tensor([[0.3, -0.4, -3.0], [-2.0, 0.5, -2.2]])
    w2c = look_at(eyes, torch.zeros(2, 3))
    if n_behind:  # splats behind camera 0 (and off to the side of camera 1)
        behind = eyes[0] + torch.tensor([0.0, 0.0, -0.5]) + 0.2 * (r(n_behind, 3) - 0.5)
        extra = g.index(slice(0, n_behind)).clone()
        extra.means = behind
        extra.log_scales = torch.full((n_behind, 3), math.log(0.3))
        extra.opacity_logits = torch.full((n_behind,), 4.0)
        g = g.cat(extra)
    W, H = 45, 30  # non-square, not a multiple of any tile size
    f, c = torch.tensor([[40.0, 46.0], [41.0, 47.0]]), torch.tensor([[21.5, 23.5], [16.0, 14.2]])
    K = make_intrinsics(f[0], f[1], c[0], c[1])
    bg = r(2, 3)
    return g, K, w2c, W, H, bg


def _params(g: Gaussians):
    return {k: v.clone().requires_grad_(True) for k, v in g.as_dict().items()}


def _loss(rgb, alpha, depth, seed):
    gen = torch.Generator().manual_seed(seed)
    w = [torch.rand(t.shape, generator=gen) for t in (rgb, alpha, depth)]
    # depth only where the pixel is covered: ED divides by alpha, ill-conditioned on empty pixels
    return (w[0] * rgb).sum() + (w[1] * alpha).sum() + (w[2] * depth * (alpha.detach() > 0.2)).sum() * 0.1


# ----------------------------------------------------------------------------- container


def test_sh0_rgb_roundtrip_and_container_ops():
    rgb = torch.rand(10, 3)
    assert torch.allclose(sh0_to_rgb(rgb_to_sh0(rgb)), rgb, atol=1e-6)
    xyz = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3], [10, 0, 0]])
    g = Gaussians.from_points(xyz, torch.rand(5, 3), sh_degree=2, init_opacity=0.1)
    assert g.num == 5 and g.sh_degree == 2 and g.shN.shape == (5, 8, 3)
    # point 0: neighbours at 1, 2, 3 -> mean 2
    assert torch.allclose(g.scales[0], torch.full((3,), 2.0))
    assert torch.allclose(g.opacities, torch.full((5,), 0.1))
    assert torch.allclose(g.rgb, sh0_to_rgb(g.sh0[:, 0]).clamp(0, 1))
    both = g.cat(g.index(torch.tensor([True, False, True, False, False])))
    assert both.num == 7 and torch.equal(both.means[5:], xyz[[0, 2]])
    assert Gaussians.from_dict(g.as_dict()).means is g.means
    assert not g.to("cpu").detach().means.requires_grad
    with pytest.raises(ValueError):
        Gaussians(g.means, g.log_scales, g.quats[:, :3], g.opacity_logits, g.sh0, g.shN)
    with pytest.raises(ValueError):
        g.cat(g.with_sh_degree(1))


def test_knn_mean_distance_is_exact():
    gen = torch.Generator().manual_seed(0)
    xyz = torch.cat([torch.rand(1500, 3, generator=gen) * torch.tensor([4.0, 1, 0.2]), torch.rand(5, 3) * 50])
    d = torch.cdist(xyz.double(), xyz.double()) + torch.eye(len(xyz), dtype=torch.float64) * 1e9
    ref = d.topk(3, largest=False).values.mean(1)
    for kw in [{}, {"block": 64, "chunk": 3000}]:  # one block / many kd leaves and row chunks
        got = knn_mean_distance(xyz, **kw).double()
        assert ((got - ref).abs() / ref).max() < 1e-5, kw
    g = Gaussians.from_points(xyz, torch.rand(len(xyz), 3), chunk=3000)
    assert torch.allclose(g.log_scales, knn_mean_distance(xyz).log()[:, None].expand(-1, 3))


# ----------------------------------------------------------------------------- rasterizer


@pytest.mark.parametrize(
    ("seed", "sh_degree", "tile", "chunk", "keep"),
    [
        (0, 0, None, None, None),  # defaults
        (1, 1, 4, 1024, 0),  # small tiles, many chunks, backward recomputes the forward
        (2, 3, 8, None, None),
        (3, 2, 16, 4096, None),
    ],
)
def test_torch_backend_matches_gsplat_reference(monkeypatch, seed, sh_degree, tile, chunk, keep):
    mod = sys.modules["fourdgen.gaussians.rasterize"]  # (the package attribute is the function)
    monkeypatch.setattr(mod, "TILE", tile)
    if chunk is not None:
        monkeypatch.setitem(mod.CHUNK_ELEMS, "cpu", chunk)
    if keep is not None:
        monkeypatch.setattr(mod, "KEEP_ELEMS", keep)
    g, K, w2c, W, H, bg = random_scene(seed, sh_degree=sh_degree)
    p_ref, p_ours = _params(g), _params(g)
    rgb, alpha, depth, radii_ref = reference_render(Gaussians.from_dict(p_ref), K, w2c, W, H, bg, sh_degree)
    out = rasterize(p_ours, K, w2c, W, H, backend="torch", background=bg)
    assert out.rgb.shape == (2, H, W, 3) and out.alpha.shape == out.depth.shape == (2, H, W, 1)
    # achieved ~2e-6 (float32 rounding; same per-pixel rules, so no threshold flips)
    assert (rgb - out.rgb).abs().max() < 1e-5
    assert (alpha - out.alpha).abs().max() < 1e-5
    cov = alpha > 0.2
    assert (depth - out.depth)[cov].abs().max() < 1e-5 * depth[cov].abs().max()
    assert alpha.max() > 0.9 and (alpha < 0.01).any()  # the scene is not trivial
    # radii: ours are gsplat-CUDA's opacity-aware boxes, never larger than the 3.33-sigma ones
    vis_ref, vis = (radii_ref > 0).all(-1), (out.info["radii"] > 0).all(-1)
    assert (vis <= vis_ref).all() and (out.info["radii"][vis] <= radii_ref[vis]).all()

    _loss(rgb, alpha, depth, seed).backward()
    _loss(out.rgb, out.alpha, out.depth, seed).backward()
    for k in ["means", "log_scales", "quats", "opacity_logits", "sh0", "shN"]:
        gr, go = p_ref[k].grad, p_ours[k].grad
        if gr.numel() == 0:
            continue
        err = (gr - go).abs().max() / gr.abs().max()
        assert err < 1e-4, f"{k}: relative gradient error {err:.2e}"  # achieved <= ~3e-6


def test_backward_gradcheck_float64():
    """Finite differences vs the hand-written backward (and autograd through the projection)."""
    gen = torch.Generator().manual_seed(8)
    g = Gaussians.from_points(
        torch.randn(12, 3, generator=gen) * 0.4,
        torch.rand(12, 3, generator=gen),
        sh_degree=1,
        init_opacity=0.6,
    ).to(dtype=torch.float64)
    K = make_intrinsics(30.0, 30.0, 16.0, 12.0)[None].double()
    w2c = look_at(torch.tensor([0.0, 0, -3]), torch.zeros(3))[None].double()
    p = _params(g)

    def f(means, log_scales, quats, opacity_logits, sh0):
        q = dict(p, means=means, log_scales=log_scales, quats=quats, opacity_logits=opacity_logits, sh0=sh0)
        o = rasterize(q, K, w2c, 32, 24, backend="torch", background=torch.ones(3, dtype=torch.float64))
        return o.rgb, o.alpha, o.depth * (o.alpha.detach() > 0.3)

    inputs = [p[k] for k in ["means", "log_scales", "quats", "opacity_logits", "sh0"]]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)


def test_projection_matches_gsplat_reference():
    g, K, w2c, W, H, _ = random_scene(5, n=400, n_behind=20)
    covars, _ = gref._quat_scale_to_covar_preci(g.quats, g.scales, compute_preci=False)
    radii_ref, m_ref, d_ref, c_ref, _ = gref._fully_fused_projection(g.means, covars, w2c, K, W, H)
    radii, m, d, c = project_gaussians(g.means, g.quats, g.scales, g.opacities, w2c, K, W, H)
    vis = (radii > 0).all(-1)
    assert vis.sum() > 300
    assert torch.allclose(m[vis], m_ref[vis], rtol=1e-5, atol=1e-4)
    assert torch.allclose(c[vis], c_ref[vis], rtol=1e-4, atol=1e-6)
    assert torch.allclose(d, d_ref)
    assert not vis[0, -20:].any()  # behind camera 0
    # antialiased mode's opacity compensation, against gsplat's reference
    *_, comp_ref = gref._fully_fused_projection(g.means, covars, w2c, K, W, H, calc_compensations=True)
    *_, comp = project_gaussians(g.means, g.quats, g.scales, g.opacities, w2c, K, W, H, compensate=True)
    assert torch.allclose(comp[vis], comp_ref[vis], rtol=1e-4, atol=1e-6)
    assert (comp[vis] < 1).all() and (comp[vis] > 0).all()


def test_antialiased_mode_keeps_a_small_splats_weight():
    """One splat much smaller than a pixel: classic mode renders the 0.3 px dilated blob at full
    opacity; antialiased mode scales its opacity so the rendered weight ~ the splat's own (tiny)."""
    K = torch.tensor([[[50.0, 0, 16.5], [0, 50.0, 16.5], [0, 0, 1]]])  # the splat on a pixel centre
    w2c = torch.eye(4)[None]
    g = {
        "means": torch.tensor([[0.0, 0.0, 5.0]]),
        "quats": torch.tensor([[1.0, 0, 0, 0]]),
        "log_scales": torch.full((1, 3), math.log(0.01)),  # 0.1 px on screen
        "opacity_logits": torch.tensor([4.0]),
        "colors": torch.ones(1, 3),
    }
    classic = rasterize(g, K, w2c, 32, 32, backend="torch")
    aa = rasterize(g, K, w2c, 32, 32, backend="torch", rasterize_mode="antialiased")
    o = torch.sigmoid(torch.tensor(4.0))
    s2 = (50 * 0.01 / 5) ** 2  # screen variance of the splat, px^2
    comp = s2 / (s2 + 0.3)  # sqrt(det ratio) of an isotropic 2-D Gaussian
    assert torch.allclose(classic.alpha.max(), o, rtol=1e-3)
    assert torch.allclose(aa.alpha.max(), o * comp, rtol=1e-3)
    with pytest.raises(ValueError, match="rasterize_mode"):
        rasterize(g, K, w2c, 32, 32, backend="torch", rasterize_mode="mip")


def test_a_large_cpu_render_warns_once_when_a_gpu_is_there(monkeypatch):
    """The trap after ``trainer.fit`` (Lightning moves the model to the CPU): a GPU-size render
    with ``backend='auto'`` on CPU tensors warns once; small renders and an explicit
    ``backend='torch'`` do not."""
    rmod = importlib.import_module("fourdgen.gaussians.rasterize")  # the package exports the function
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rmod, "_cpu_warned", False)
    monkeypatch.setattr(rmod, "_CPU_WARN_COUNT", 8)
    K, w2c = torch.tensor([[[8.0, 0, 4], [0, 8.0, 4], [0, 0, 1]]]), torch.eye(4)[None]

    def gs(n):
        means = torch.zeros(n, 3)
        means[:, 2] = 3
        return {"means": means, "quats": torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4),
                "log_scales": torch.full((n, 3), -2.0), "opacity_logits": torch.zeros(n),
                "colors": torch.ones(n, 3)}  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rasterize(gs(4), K, w2c, 8, 8)  # small: no warning
        rasterize(gs(8), K, w2c, 8, 8, backend="torch")  # on purpose: none
    with pytest.warns(UserWarning, match=r"8 Gaussians rendered on the CPU.*model.cuda\(\)"):
        rasterize(gs(8), K, w2c, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rasterize(gs(8), K, w2c, 8, 8)  # once per process


def test_gaussians_behind_camera_contribute_nothing():
    g, K, w2c, W, H, bg = random_scene(3, n=60, n_behind=30)
    out_all = rasterize(g, K, w2c, W, H, backend="torch", background=bg)
    out_front = rasterize(g.index(slice(0, 60)), K, w2c, W, H, backend="torch", background=bg)
    assert not (out_all.info["radii"][0, 60:] > 0).any()
    assert torch.allclose(out_all.rgb[0], out_front.rgb[0], atol=1e-6)
    # nothing but those splats: camera 0 renders pure background with zero alpha
    only = rasterize(g.index(slice(60, 90)), K, w2c, W, H, backend="torch", background=bg)
    assert only.alpha[0].abs().max() == 0 and torch.allclose(only.rgb[0], bg[0].expand(H, W, 3))
    p = _params(g.index(slice(60, 90)))
    only = rasterize(p, K[:1], w2c[:1], W, H, backend="torch")
    (only.rgb.sum() + only.alpha.sum()).backward()
    assert all(torch.isfinite(v.grad).all() and v.grad.abs().sum() == 0 for v in p.values())


def test_packed_and_mapping_inputs_agree():
    g, K, w2c, W, H, bg = random_scene(4, n=120, sh_degree=1)
    a = rasterize(g, K, w2c, W, H, backend="torch", background=bg[0])
    b = rasterize(g.as_dict(), K, w2c, W, H, backend="torch", background=bg[0], packed=True)
    gsplat_names = {
        "means": g.means,
        "quats": g.quats,
        "scales": g.log_scales,
        "opacities": g.opacity_logits,
        "colors": sh0_to_rgb(g.sh0[:, 0]),
    }
    c = rasterize(gsplat_names, K, w2c, W, H, backend="torch", background=bg[0])
    d = rasterize(g, K, w2c, W, H, backend="torch", background=bg[0], sh_degree=0)
    assert torch.equal(a.rgb, b.rgb) and torch.allclose(c.rgb, d.rgb, atol=1e-6)
    assert b.info["means2d"].shape == (len(b.info["gaussian_ids"]), 2)
    assert torch.equal(b.info["radii"], a.info["radii"][b.info["camera_ids"], b.info["gaussian_ids"]])
    e = rasterize(g, K, w2c, W, H, backend="torch", render_depth=False)
    assert e.depth is None and torch.allclose(e.alpha, a.alpha)


@pytest.mark.parametrize("packed", [False, True])
def test_gsplat_default_strategy_cycle(packed):
    from gsplat.strategy import DefaultStrategy

    g, K, w2c, W, H, _ = random_scene(6, n=200, sh_degree=1)
    g.opacity_logits[:10] = -8.0  # to be pruned (below prune_opa); out of view: no gradient
    names = {"means": "means", "log_scales": "scales", "quats": "quats", "opacity_logits": "opacities"}
    params = torch.nn.ParameterDict({names.get(k, k): torch.nn.Parameter(v) for k, v in g.as_dict().items()})
    opts = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    strategy = DefaultStrategy(
        refine_start_iter=0, refine_every=2, grow_grad2d=1e-7, reset_every=10**6, absgrad=packed
    )
    strategy.check_sanity(params, opts)
    state = strategy.initialize_state(scene_scale=1.0)
    for step in range(3):
        out = rasterize(params, K, w2c, W, H, backend="torch", packed=packed, absgrad=packed)
        strategy.step_pre_backward(params, opts, state, step, out.info)
        out.rgb.mean().backward()
        n_before = len(params["means"])
        for o in opts.values():
            o.step()
            o.zero_grad()
        strategy.step_post_backward(params, opts, state, step, out.info, packed=packed)
    assert out.info["means2d"].grad is not None
    if packed:  # per-pixel |dL/dmean2d| summed: at least |dL/dmean2d| (triangle inequality)
        m2 = out.info["means2d"]
        assert m2.absgrad.shape == m2.shape and (m2.absgrad >= m2.grad.abs() * (1 - 1e-5)).all()
        assert (m2.absgrad > m2.grad.abs() * 1.01).any()
    n = len(params["means"])
    assert n > n_before  # grew (split/duplicate) ...
    assert (torch.sigmoid(params["opacities"]) > strategy.prune_opa).all()  # ... and pruned
    for k, p in params.items():
        assert p.shape[0] == n
        opt = opts[k]
        assert opt.param_groups[0]["params"][0] is p
        assert opt.state[p]["exp_avg"].shape == p.shape
    out = rasterize(params, K, w2c, W, H, backend="torch")  # still renders
    assert out.rgb.isfinite().all()


def test_size_prune_by_distance_keeps_a_far_background_and_is_3dgs_inside_the_rig():
    """3DGS prunes Gaussians above ``prune_scale3d`` x extent once past ``reset_every``; by distance,
    the limit grows with the distance from the cameras' centre beyond the extent. Plain reference:
    extent 2 (limit 0.2 inside the rig); a 1-unit Gaussian 0.5 from the centre goes either way, one
    20 units away (limit 2) stays by distance; a transparent one goes; before the first reset
    nothing is pruned for size."""
    means = torch.tensor([[0.5, 0, 0], [0, 0, 20.0], [0, 20.0, 0], [0, 0, 1.0]])
    scales = torch.log(torch.tensor([1.0, 1.0, 3.0, 0.05]))[:, None].expand(4, 3).clone()
    opacities = torch.tensor([3.0, 3.0, 3.0, -6.0])  # the last below prune_opa

    def pruned(by_distance, step, center=(0.0, 0.0, 0.0)):
        params = torch.nn.ParameterDict(
            {
                "means": torch.nn.Parameter(means.clone()),
                "scales": torch.nn.Parameter(scales.clone()),
                "opacities": torch.nn.Parameter(opacities.clone()),
            }
        )
        opts = {k: torch.optim.Adam([p]) for k, p in params.items()}
        strategy = BudgetStrategy(prune_to=0, reset_every=100, prune_scale3d_by_distance=by_distance)
        state = strategy.initialize_state(scene_scale=2.0)
        state["scene_center"] = center
        state["grad2d"], state["count"] = torch.zeros(4), torch.zeros(4)
        strategy._prune_gs(params, opts, state, step)
        assert state["grad2d"].shape == (len(params["means"]),)  # the state follows the surgery
        kept = params["means"].detach()
        return [i for i in range(4) if not (kept == means[i]).all(-1).any()]

    assert pruned(False, 101) == [0, 1, 2, 3]  # gsplat: every Gaussian above 0.2, and the transparent one
    assert pruned(True, 101) == [0, 2, 3]  # 20 units out: limit 0.1 x 20 = 2 keeps the 1, not the 3
    # from a centre at the second: the first is 20 out (kept), the second inside (pruned), the third
    # 28 out (limit 2.8 < 3)
    assert pruned(True, 101, center=(0.0, 0.0, 20.0)) == [1, 2, 3]
    assert pruned(True, 100) == pruned(False, 100) == [3]  # no size prune until past reset_every


def test_budget_accumulate_adds_each_renders_statistics():
    """``accumulate`` (extra renders of a step) adds what a plain reference says: per render, the
    norm of dL/dmeans2d in [-1, 1] screen units for every Gaussian it shows, and one count."""
    g, K, w2c, W, H, _ = random_scene(2, n=60, n_behind=6)  # those are culled in view 0
    names = {"log_scales": "scales", "opacity_logits": "opacities"}
    params = torch.nn.ParameterDict({names.get(k, k): torch.nn.Parameter(v) for k, v in g.as_dict().items()})
    N = g.num
    strategy = BudgetStrategy(refine_scale2d_stop_iter=1)  # also tracks the largest radii
    state = strategy.initialize_state(scene_scale=1.0)
    outs = [rasterize(params, K[i : i + 1], w2c[i : i + 1], W, H, backend="torch") for i in range(2)]
    sum(o.rgb.square().mean() for o in outs).backward()
    for o in outs:
        strategy.accumulate(params, state, o.info)
    grad2d, count, radii = torch.zeros(N), torch.zeros(N), torch.zeros(N)
    for o in outs:
        grad, r = o.info["means2d"].grad[0], o.info["radii"][0]
        for n in range(N):
            if (r[n] > 0).all():
                gx, gy = float(grad[n, 0]) * W / 2, float(grad[n, 1]) * H / 2
                grad2d[n] += math.hypot(gx, gy)
                count[n] += 1
                radii[n] = max(float(radii[n]), float(r[n].max()) / max(W, H))
    assert 0 < count.sum() < 2 * N  # some Gaussians are out of one view
    torch.testing.assert_close(state["grad2d"], grad2d, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(state["count"], count)
    torch.testing.assert_close(state["radii"], radii)
    # one render of both cameras ([C, N] statistics, summed over C without a host sync): the same
    # sums (the loss averages the cameras, gsplat's scale by C undoes it), and gsplat's own
    # gather-and-scatter agrees on grad2d and count
    params.zero_grad()
    both = rasterize(params, K, w2c, W, H, backend="torch")
    both.rgb.square().mean().backward()
    ours, gsplats = strategy.initialize_state(scene_scale=1.0), strategy.initialize_state(scene_scale=1.0)
    strategy.accumulate(params, ours, both.info)
    DefaultStrategy._update_state(strategy, params, gsplats, both.info)
    # one backward through both cameras sums in another order than two: float32 rounding (2e-5
    # relative seen on one CPU), not a different statistic
    torch.testing.assert_close(ours["grad2d"], grad2d, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(ours["count"], count)
    torch.testing.assert_close(ours["radii"], radii)
    torch.testing.assert_close(ours["grad2d"], gsplats["grad2d"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ours["count"], gsplats["count"])


# -------------------------------------------------------------------------- fit math


def test_camera_extent_and_foreground_bounds_match_a_plain_reference():
    angles = torch.linspace(0, math.pi / 2, 4)  # an arc of cameras 4 units from the origin
    eyes = torch.stack([4 * torch.sin(angles), torch.zeros(4), -4 * torch.cos(angles)], -1)
    w2c = look_at(eyes, torch.zeros(4, 3))
    centers = eyes.double().tolist()
    mean = [sum(c[i] for c in centers) / 4 for i in range(3)]
    ref_extent = 1.1 * max(math.dist(c, mean) for c in centers)
    assert camera_extent(w2c).item() == pytest.approx(ref_extent, rel=1e-5)
    assert camera_extent(w2c[:1]).item() == pytest.approx(1.1e-3)  # one camera: the floor

    g = torch.Generator().manual_seed(0)
    fg = torch.rand(300, 3, generator=g) * 2 - 1  # the box the cameras look at
    far = torch.randn(40, 3, generator=g) * 30 + torch.tensor([0.0, 0.0, 60.0])  # a far background
    lo, hi = foreground_bounds(torch.cat([fg, far]), w2c, radius=0.75, quantile=0.05)
    # reference: points within 0.75 x 4 of the focus point (the origin), linear quantiles, 10% pad
    near = fg.double().numpy()[np.linalg.norm(fg.double().numpy(), axis=1) < 3.0]
    q_lo, q_hi = np.quantile(near, [0.05, 0.95], axis=0)
    pad = 0.1 * (q_hi - q_lo)
    torch.testing.assert_close(lo.double(), torch.from_numpy(q_lo - pad), atol=1e-4, rtol=0)
    torch.testing.assert_close(hi.double(), torch.from_numpy(q_hi + pad), atol=1e-4, rtol=0)
    assert lo.dtype == torch.float32 and (hi - lo).max() < 2.5  # the background did not stretch it
    # fewer than min_points in the foreground: every point counts; a flat axis is padded anyway
    few = torch.cat([fg[:5], far])
    lo, hi = foreground_bounds(few, w2c, quantile=0.0)
    torch.testing.assert_close(lo, few.min(0).values - 0.1 * (few.max(0).values - few.min(0).values))
    flat = torch.cat([fg[:, :2], torch.zeros(300, 1)], -1)
    lo, hi = foreground_bounds(flat, w2c)
    assert lo[2].item() == pytest.approx(-1e-4) and hi[2].item() == pytest.approx(1e-4)


def test_photometric_loss_and_hexplane_regularization():
    g = torch.Generator().manual_seed(0)
    preds = [
        torch.rand(1, 3, 16, 20, generator=g).requires_grad_(True),
        torch.rand(1, 3, 12, 12, generator=g),
    ]
    gts = [torch.rand(1, 3, 16, 20, generator=g), torch.rand(1, 3, 12, 12, generator=g)]  # sizes may differ
    out = photometric_loss(preds, gts, ssim_weight=0.2)
    l1 = (
        sum(
            sum(abs(a - b) for a, b in zip(p.flatten().tolist(), t.flatten().tolist(), strict=True))
            / p.numel()
            for p, t in zip(preds, gts, strict=True)
        )
        / 2
    )
    mean_ssim = sum(ssim(p.detach(), t) for p, t in zip(preds, gts, strict=True)) / 2
    assert out.l1.item() == pytest.approx(l1, rel=1e-5)
    assert out.dssim.item() == pytest.approx(1 - mean_ssim.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(0.8 * l1 + 0.2 * (1 - mean_ssim.item()), rel=1e-5)
    out.loss.backward()
    assert preds[0].grad.abs().sum() > 0
    same = photometric_loss(gts, gts, ssim_weight=0.2)
    assert same.loss.abs().item() < 1e-5 and same.l1.item() == 0
    with pytest.raises(ValueError, match="1 preds and 2 targets"):
        photometric_loss(preds[:1], gts, 0.2)

    reg = {"tv": torch.tensor(2.0), "time_smooth": torch.tensor(3.0), "time_l1": torch.tensor(5.0)}
    total = add_hexplane_regularization(torch.tensor(1.0), reg, tv=0.1, time_smooth=0.01, time_l1=0.001)
    assert total.item() == pytest.approx(1.0 + 0.2 + 0.03 + 0.005)


def test_inverse_depth_l1_matches_a_plain_reference():
    g = torch.Generator().manual_seed(1)
    preds = [torch.rand(5, 7, generator=g) * 4 + 0.5, torch.rand(3, 3, generator=g) * 4]
    targets = [torch.rand(5, 7, generator=g) * 4 + 0.5, torch.rand(3, 3, generator=g) * 4 + 0.5]
    targets[0][0, :3] = 0  # unknown pixels do not count
    preds[1][1, 1] = 0  # nothing rendered there: no gradient, does not count
    preds[1][2, 2] = 1e-4  # a near splat: clamped, not inf
    want = 0.0
    for p_, t_ in zip(preds, targets, strict=True):
        terms = [
            abs(1 / max(a, 1e-3) - 1 / b)
            for a, b in zip(p_.flatten().tolist(), t_.flatten().tolist(), strict=True)
            if b > 0 and a > 0
        ]
        want += sum(terms) / len(terms) / 2
    got = inverse_depth_l1([p.requires_grad_() for p in preds], targets)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert preds[0].grad[0, :3].abs().sum() == 0 and preds[0].grad[1:].abs().sum() > 0
    assert inverse_depth_l1([torch.ones(2, 2)], [torch.zeros(2, 2)]).item() == 0  # no known pixel


def test_dropped_logits_leave_out_and_compensate_like_a_plain_reference():
    logits = torch.tensor([0.0, 2.0, -1.0, -200.0, 8.0, 0.5], requires_grad=True)
    keep = torch.tensor([True, True, False, True, True, False])
    rate = 0.25
    out = dropped_logits(logits, keep, rate)
    for i, (lg, k) in enumerate(zip(logits.tolist(), keep.tolist(), strict=True)):
        alpha = float(torch.sigmoid(out[i]))
        if not k:
            assert alpha < 1e-12  # left out
        else:  # the kept ones: opacity / (1 - rate), within (0, 1)
            want = min(max(1 / (1 + math.exp(-lg)) / (1 - rate), 1e-6), 1 - 1e-6)
            assert alpha == pytest.approx(want, rel=1e-4)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()  # also for alpha 0 (faded out) and the dropped ones
    assert logits.grad[~keep].abs().sum() == 0
    g = torch.Generator().manual_seed(3)
    m = keep_mask(20_000, 0.2, g, torch.device("cpu"))
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.8) < 0.01
    assert torch.equal(m, keep_mask(20_000, 0.2, torch.Generator().manual_seed(3), torch.device("cpu")))


def test_learning_rate_schedule():
    """Positions decay log-linearly from the start, the deformation field from the fine stage; the
    factors are plain functions, so LambdaLR keeps nothing of them in checkpoints."""
    lr = LearningRates(means=1e-3, means_final=1e-5, deformation=1e-2, deformation_final=1e-4, max_steps=100)
    assert lr.initial("means", 2.0) == 2e-3 and lr.initial("grid", 2.0) == 2 * lr.grid
    assert lr.initial("deformation", 2.0) == 2e-2 and lr.initial("scales", 2.0) == lr.scales
    means, deform, opac = lr.factor("means"), lr.factor("deformation", fine_start=30), lr.factor("opacities")
    assert means(0) == pytest.approx(1.0) and means(100) == pytest.approx(1e-2) and means(500) == means(100)
    assert means(50) == pytest.approx(0.1)  # log-linear: the geometric middle
    assert deform(0) == deform(30) == pytest.approx(1.0)
    assert deform(80) == pytest.approx(0.1) and deform(130) == pytest.approx(1e-2)
    assert opac(0) == opac(10**6) == 1.0
    assert exp_decay(10, 0.0, 1.0, 100) == 0.0
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.Adam([{"params": [p], "lr": 1.0} for p in params])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [means, deform, opac])
    assert sched.state_dict()["lr_lambdas"] == [None, None, None]


@pytest.mark.slow
def test_tiny_fit_learns():
    torch.manual_seed(0)
    W = H = 40
    K = make_intrinsics(45.0, 45.0, W / 2, H / 2)[None]
    w2c = look_at(torch.tensor([0.0, 0.0, -3.0]), torch.zeros(3))[None]
    v, u = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    disk = ((u**2 + v**2) < 0.5).float()
    target = torch.stack([disk * (0.5 + 0.5 * u), 1 - disk, 0.5 + 0.4 * v], -1)[None].clamp(0, 1)
    g = Gaussians.from_points(torch.rand(500, 3) * 2.4 - 1.2, torch.rand(500, 3), init_opacity=0.5)
    params = {k: v.requires_grad_(True) for k, v in g.as_dict().items()}
    lrs = {"means": 3e-3, "log_scales": 1e-2, "quats": 1e-2, "opacity_logits": 5e-2, "sh0": 2e-2, "shN": 1e-3}
    opt = torch.optim.Adam([{"params": [params[k]], "lr": lr} for k, lr in lrs.items()])
    losses = []
    for _ in range(100):
        out = rasterize(params, K, w2c, W, H, backend="torch", background=torch.zeros(3))
        loss = (out.rgb - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0], losses[::10]


# ----------------------------------------------------------------------------- PLY


@pytest.mark.parametrize("sh_degree", [0, 3])
def test_ply_roundtrip_exact(tmp_path, sh_degree):
    g, *_ = random_scene(7, n=50, sh_degree=sh_degree)
    path = save_ply(tmp_path / "sub" / "g.ply", g)
    h = load_ply(path)
    for k, v in g.as_dict().items():
        assert torch.equal(getattr(h, k), v), k
    assert h.sh_degree == sh_degree
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["g.ply"]  # no temp file left
    v = PlyData.read(str(path))["vertex"]
    names = [p.name for p in v.properties]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    if sh_degree:  # channel-major: f_rest_{c * (K-1) + k} = shN[:, k, c]
        assert len(names) == 17 + 45
        assert np.array_equal(v["f_rest_1"], g.shN[:, 1, 0].numpy())
        assert np.array_equal(v["f_rest_15"], g.shN[:, 0, 1].numpy())


def test_ply_sequence_and_errors(tmp_path):
    gs = [random_scene(s, n=5)[0] for s in range(3)]
    paths = save_ply_sequence(tmp_path / "seq", gs)
    assert [p.name for p in paths] == ["frame_0000.ply", "frame_0001.ply", "frame_0002.ply"]
    assert torch.equal(load_ply(paths[2]).means, gs[2].means)
    arr = np.zeros(3, dtype=[(n, "f4") for n in ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]])
    bad = tmp_path / "bad.ply"
    PlyData([PlyElement.describe(arr, "vertex")]).write(str(bad))
    with pytest.raises(ValueError, match=r"bad\.ply.*scale_0"):
        load_ply(bad)
    junk = tmp_path / "junk.ply"
    junk.write_bytes(b"not a ply")
    with pytest.raises(ValueError, match=r"junk\.ply"):
        load_ply(junk)
