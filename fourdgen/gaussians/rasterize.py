"""Render 3D Gaussians with gsplat (CUDA) or with a pure-torch rasterizer of the same semantics.

Why a hand-written torch backend: gsplat's CUDA kernels need a GPU, and gsplat's own torch
reference (``gsplat.cuda._torch_impl._rasterize_to_pixels``) still calls a CUDA kernel to list
pixel/Gaussian pairs and loops over them in Python, far too slow to train with on a CPU. Here the
projection is gsplat's EWA projection written in batched torch, and compositing is tile-based:

1. every visible Gaussian is binned into the small pixel tiles (4x4 or 8x8, by splat size) that
   its opacity-aware 3-sigma box covers (tile size does not change the result: the box is
   conservative and each pixel's list stays depth-sorted);
2. tiles are grouped by their list length into chunks of a bounded number of (tile, slot, pixel)
   evaluations, so memory is bounded and padding small;
3. per chunk, log-alpha of every (slot, pixel) pair is ONE matmul (it is a quadratic in the pixel
   offset from the tile centre), front-to-back transmittance is a cumprod and the colours are a
   batched matmul; a custom backward does the same in reverse (suffix sums, matmuls), instead of
   autograd saving a dozen [tiles, slots, pixels] tensors.

gsplat's per-pixel rules are reproduced exactly: alpha = min(0.999, opacity * exp(-maha / 2)),
pairs with alpha < 1/255 are skipped, a pixel stops before the Gaussian that would bring its
transmittance to <= 1e-4, expected depth = sum(w z) / sum(w) ("ED"), colour = SH + 0.5 clamped at 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from gsplat.cuda._torch_impl import _quat_to_rotmat, _spherical_harmonics
from torch import Tensor

from fourdgen.gaussians.container import SH_C0, Gaussians, sh_degree_from_bases

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4
TILE = None  # internal tile size of the torch backend; None: from the splat sizes (_tile_size)
CHUNK_ELEMS = {"cpu": 2**18, "cuda": 2**24}  # [tiles, slots, pixels] elements per chunk
KEEP_ELEMS = 2**26  # keep forward intermediates for backward below this size, else recompute


@dataclass
class RenderOutput:
    """``rgb [C, H, W, 3]``, ``alpha [C, H, W, 1]``, ``depth [C, H, W, 1]`` (expected z-depth, or
    None) and ``info``: gsplat's meta dict (``means2d``, ``radii``, ``width``, ``height``,
    ``n_cameras``, ``gaussian_ids``, ... as gsplat's strategies read them)."""

    rgb: Tensor
    alpha: Tensor
    depth: Tensor | None
    info: dict[str, Any] = field(default_factory=dict)


def _unpack(g: Gaussians | Mapping[str, Tensor]):
    """-> means, quats, scales, opacities, colours (SH [N, K, 3] or RGB [N, D]), available degree."""
    if isinstance(g, Gaussians):
        return g.means, g.quats, g.scales, g.opacities, g.sh, g.sh_degree
    # gsplat-trainer names ("scales"/"opacities" hold log-scales/logits) or Gaussians field names
    log_s = g["log_scales"] if "log_scales" in g else g["scales"]
    logit = g["opacity_logits"] if "opacity_logits" in g else g["opacities"]
    if "colors" in g:
        return g["means"], g["quats"], log_s.exp(), torch.sigmoid(logit), g["colors"], None
    sh = torch.cat([g["sh0"], g["shN"]], 1) if "shN" in g else g["sh0"]
    return g["means"], g["quats"], log_s.exp(), torch.sigmoid(logit), sh, sh_degree_from_bases(sh.shape[1])


def project_gaussians(
    means, quats, scales, opacities, w2c, K, width, height, eps2d=0.3, near=0.01, far=1e10, compensate=False
):
    """EWA projection, gsplat's ``fully_fused_projection`` (CUDA semantics, non-packed).

    means/quats/scales/opacities ``[N, 3|4|3|-]``, w2c ``[C, 4, 4]``, K ``[C, 3, 3]`` ->
    radii ``[C, N, 2]`` int32 (0 = culled), means2d ``[C, N, 2]``, depths ``[C, N]``, conics ``[C, N, 3]``;
    with ``compensate`` also ``[C, N]``: the opacity factor of gsplat's ``antialiased`` mode
    (Mip-Splatting's 2-D filter), ``sqrt(det(cov2d) / det(cov2d + eps2d I))``, which keeps a splat's
    integrated weight when the ``eps2d`` dilation widens it.
    """
    R, t = w2c[:, :3, :3], w2c[:, :3, 3]
    p = torch.einsum("cij,nj->cni", R, means) + t[:, None]
    x, y, z = p.unbind(-1)
    ok = (z > near) & (z < far)
    zs = torch.where(ok, z, torch.ones_like(z))  # culled splats stay finite: no NaN in gradients
    fx, fy, cx, cy = (K[:, i, j, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
    # Jacobian evaluated at the mean clamped to 1.3x the frustum (gsplat/3DGS), which keeps
    # splats far off-screen from blowing up
    mx, my = 0.15 * width / fx, 0.15 * height / fy
    tx = zs * (x / zs).clamp(min=-(cx / fx + mx), max=(width - cx) / fx + mx)
    ty = zs * (y / zs).clamp(min=-(cy / fy + my), max=(height - cy) / fy + my)
    O = torch.zeros_like(zs)
    J = torch.stack([fx / zs, O, -fx * tx / zs**2, O, fy / zs, -fy * ty / zs**2], -1).unflatten(-1, (2, 3))
    RS = _quat_to_rotmat(quats) * scales[:, None, :]  # [N, 3, 3], covariance = RS RS^T
    A = torch.einsum("cnij,cjk,nkl->cnil", J, R, RS)  # [C, N, 2, 3], cov2d = A A^T
    a = (A[..., 0, :] ** 2).sum(-1) + eps2d
    c = (A[..., 1, :] ** 2).sum(-1) + eps2d
    b = (A[..., 0, :] * A[..., 1, :]).sum(-1)
    det = (a * c - b * b).clamp_min(1e-10)
    conics = torch.stack([c / det, -b / det, a / det], -1)
    if compensate:
        det0 = (a - eps2d) * (c - eps2d) - b * b
        comp = torch.sqrt((det0 / det).clamp_min(0.0))
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], -1)
    with torch.no_grad():
        # opacity-aware box (gsplat >= 1.5): alpha < 1/255 beyond sqrt(2 ln(255 o)) sigmas
        op = opacities.expand_as(z)
        ext = torch.sqrt(2.0 * torch.log(op.clamp_min(ALPHA_MIN) / ALPHA_MIN)).clamp_max(3.33)
        r = torch.ceil(ext[..., None] * torch.stack([a, c], -1).sqrt())
        m = means2d
        inside = (m[..., 0] + r[..., 0] > 0) & (m[..., 0] - r[..., 0] < width)
        inside &= (m[..., 1] + r[..., 1] > 0) & (m[..., 1] - r[..., 1] < height)
        keep = ok & (op >= ALPHA_MIN) & inside & (r > 0).any(-1)
        radii = torch.where(keep[..., None], r, 0.0).int()
    if compensate:
        return radii, means2d, z, conics, comp
    return radii, means2d, z, conics


@dataclass
class _Plan:
    """Tile binning of one render: intersections sorted by (tile, depth) and chunked tile lists."""

    n_tiles: int
    ent: Tensor  # [I] flattened entry (camera x Gaussian, or packed row) of each intersection
    centre: Tensor  # [I, 2] centre of the intersection's tile in pixels
    chunks: list  # (tile ids [t], intersection ids [t, M] padded with I)
    basis: Tensor  # [P, 6] (1, u, v, u^2, v^2, uv) of pixel offsets from the tile centre
    keep: bool
    absgrad_of: Tensor | None = None


@torch.no_grad()
def _tile_size(radii: Tensor, cuda: bool) -> int:
    """Tiles about as large as the splats waste the least work. Measured: on CPU 4 px for mean
    radii under 5 px, else 8; on an H100 8 (with 2^24-element chunks) for 10k-200k splats."""
    r = radii[(radii > 0).all(-1)].float()
    return 8 if cuda or len(r) == 0 or r.mean() >= 5 else 4


@torch.no_grad()
def _make_plan(means2d, radii, depths, cams, n_cams, width, height, ts) -> _Plan:
    dev = means2d.device
    tw, th = math.ceil(width / ts), math.ceil(height / ts)
    ent = (radii > 0).all(-1).nonzero()[:, 0]
    ent = ent[torch.sort(depths[ent], stable=True).indices]  # depth order survives the stable tile sort
    m, r = means2d[ent].float(), radii[ent].float()
    # pixel columns/rows whose centres (i + .5) lie inside the box, then the tiles holding them
    lo = torch.ceil(m - r - 0.5).clamp_min(0).long()
    hi = torch.minimum(torch.floor(m + r - 0.5).long(), torch.tensor([width - 1, height - 1], device=dev))
    t0, n = lo // ts, (hi // ts - lo // ts + 1).clamp_min(0) * (hi >= lo)
    cnt = n[:, 0] * n[:, 1]
    rep = torch.repeat_interleave(torch.arange(len(ent), device=dev), cnt)
    k = torch.arange(len(rep), device=dev) - (torch.cumsum(cnt, 0) - cnt).index_select(0, rep)
    t0, n = t0.index_select(0, rep), n.index_select(0, rep)
    tx, ty = t0[:, 0] + k % n[:, 0], t0[:, 1] + k // n[:, 0]
    tile, order = torch.sort(cams[ent].index_select(0, rep) * (tw * th) + ty * tw + tx, stable=True)
    I = len(tile)
    centre = torch.stack([tx[order], ty[order]], -1).to(means2d.dtype).add_(0.5).mul_(ts)
    counts = torch.bincount(tile, minlength=n_cams * th * tw)
    start = torch.cumsum(counts, 0) - counts
    act = counts.nonzero()[:, 0]
    c_act, o = counts[act].sort(descending=True)
    act, chunks, c_list, s = act[o], [], c_act.tolist(), 0
    budget, P = CHUNK_ELEMS["cuda" if means2d.is_cuda else "cpu"], ts * ts
    while s < len(c_list):
        M = c_list[s]
        e = min(len(c_list), s + max(1, budget // (M * P)))
        tl, slot = act[s:e], torch.arange(M, device=dev)
        idx = torch.where(slot < counts[tl, None], start[tl, None] + slot, I)
        chunks.append((tl, idx))
        s = e
    u = torch.arange(ts, device=dev, dtype=means2d.dtype) + 0.5 - ts / 2
    uy, ux = torch.meshgrid(u, u, indexing="ij")
    ux, uy = ux.reshape(-1), uy.reshape(-1)
    basis = torch.stack([torch.ones_like(ux), ux, uy, ux * ux, uy * uy, ux * uy], -1)
    padded = sum(idx.numel() for _, idx in chunks) * P
    return _Plan(n_cams * th * tw, ent[rep[order]], centre, chunks, basis, keep=padded <= KEEP_ELEMS)


def _chunk_forward(Q, F, idx, basis):
    """Composite one chunk. Q [I+1, 6] log-alpha quadratic coefficients, F [I+1, D] features,
    idx [t, M] -> out [t, P, D], alpha [t, M, P] (0 where skipped), T [t, M, P] (before each)."""
    a = torch.matmul(_take(Q, idx), basis.T)  # log alpha
    a.clamp_(min=-30.0).exp_().clamp_max_(ALPHA_MAX)  # clamp: no denormals (exp(-30) << 1/255)
    a.masked_fill_(a < ALPHA_MIN, 0.0)
    T = torch.cumprod(1.0 - a, dim=1)
    a.masked_fill_(T <= T_MIN, 0.0)  # the Gaussian that would end the pixel, and all behind it
    T = torch.cat([torch.ones_like(T[:, :1]), T[:, :-1]], 1)
    return torch.bmm((a * T).transpose(1, 2), _take(F, idx)), a, T


def _take(x, idx):
    """``x[idx]`` for a 2-D ``idx`` (index_select is much faster than advanced indexing on CPU)."""
    return x.index_select(0, idx.reshape(-1)).unflatten(0, idx.shape)


class _Composite(torch.autograd.Function):
    """Q [I+1, 6], F [I+1, D] (last rows: padding) -> per-tile sums of w * F ``[n_tiles, P, D]``."""

    @staticmethod
    def forward(ctx, Q, F, plan: _Plan):
        out = Q.new_zeros(plan.n_tiles, plan.basis.shape[0], F.shape[1])
        keep = plan.keep and any(ctx.needs_input_grad[:2])
        saved = []
        for tl, idx in plan.chunks:
            o, a, T = _chunk_forward(Q, F, idx, plan.basis)
            out.index_copy_(0, tl, o)
            saved += [a, T] if keep else []
        ctx.plan, ctx.keep = plan, keep
        ctx.save_for_backward(Q, F, *saved)  # autograd frees them after backward
        return out

    @staticmethod
    def backward(ctx, g_out):
        Q, F, *saved = ctx.saved_tensors
        plan, basis = ctx.plan, ctx.plan.basis
        gQ, gF = torch.zeros_like(Q), torch.zeros_like(F)
        absg = Q.new_zeros(Q.shape[0], 2) if plan.absgrad_of is not None else None
        for i, (tl, idx) in enumerate(plan.chunks):
            a, T = saved[2 * i : 2 * i + 2] if ctx.keep else _chunk_forward(Q, F, idx, basis)[1:]
            f, g = _take(F, idx), g_out.index_select(0, tl)  # [t, M, D], [t, P, D]
            w = a * T
            v = torch.bmm(f, g.transpose(1, 2))  # dL/dw [t, M, P]
            S = torch.cumsum(w * v, 1)
            S = S[:, -1:] - S  # sum over the Gaussians behind: sum_{j>i} w_j v_j
            # dL/dalpha_i = T_i v_i - S_i / (1 - alpha_i); times dalpha/dlog-alpha = alpha where
            # alpha was neither skipped nor clamped to 0.999
            ga = (T * v).sub_(S.div_(1.0 - a)).mul_(a).masked_fill_(a >= ALPHA_MAX, 0.0)
            flat = idx.reshape(-1)  # padding slots all hit row I, whose gradient is dropped
            gQ.index_copy_(0, flat, torch.matmul(ga, basis).reshape(-1, 6))
            gF.index_copy_(0, flat, torch.bmm(w, g).reshape(-1, F.shape[1]))
            if absg is not None:  # gsplat's absgrad: sum over pixels of |dL/dmeans2d|
                q = _take(Q, idx)
                # d log-alpha / d mean2d = (-q1 + a u + b v, -q2 + b u + c v), a = -2 q3, b = -q5, c = -2 q4
                lin = q[..., [1, 3, 5, 2, 5, 4]] * q.new_tensor([-1, -2, -1, -1, -1, -2])
                lin = torch.matmul(lin.unflatten(-1, (2, 3)), basis[:, :3].T)  # [t, M, 2, P]
                absg.index_copy_(0, flat, (ga[:, :, None] * lin).abs_().sum(-1).reshape(-1, 2))
        if absg is not None:
            tgt = plan.absgrad_of
            tgt.absgrad = absg.new_zeros(tgt.numel() // 2, 2).index_add_(0, plan.ent, absg[:-1]).view_as(tgt)
        return gQ, gF, None


def _rasterize_torch(splats, K, w2c, W, H, bg, near, far, eps2d, render_depth, absgrad, packed, mode):
    means, quats, scales, opac, colors, sh_degree = splats
    C, N = w2c.shape[0], means.shape[0]
    aa = mode == "antialiased"
    radii, means2d, depths, conics, *comp = project_gaussians(
        *splats[:4], w2c, K, W, H, eps2d, near, far, compensate=aa
    )
    if sh_degree is None:  # post-activation colours [N, D]
        rgb = colors.expand(C, N, colors.shape[-1])
    elif sh_degree == 0:
        rgb = (SH_C0 * colors[:, 0]).expand(C, N, 3).add(0.5).clamp_min(0.0)
    else:  # view-dependent colour; camera centre as gsplat computes it
        dirs = means[None] - torch.inverse(w2c)[:, None, :3, 3]
        rgb = _spherical_harmonics(sh_degree, dirs, colors.expand(C, *colors.shape)).add(0.5).clamp_min(0.0)
    op = opac * comp[0] if aa else opac.expand(C, N)  # the box above used the raw opacity, as gsplat
    info = {"camera_ids": None, "gaussian_ids": None, "batch_ids": None}
    if packed:  # gsplat's packed layout: one row per visible (camera, Gaussian)
        sel = (radii > 0).all(-1)
        cam, gid = sel.nonzero(as_tuple=True)
        radii, means2d, depths, conics, rgb, op = (t[sel] for t in (radii, means2d, depths, conics, rgb, op))
        info.update(camera_ids=cam, gaussian_ids=gid)
    else:
        cam = torch.arange(C, device=means.device).repeat_interleave(N)
    if means2d.requires_grad:
        means2d.retain_grad()
    info.update(radii=radii, means2d=means2d, depths=depths, conics=conics, opacities=op)
    info.update(width=W, height=H, n_cameras=C, n_batches=1, backend="torch")
    m2, dep, con = means2d.reshape(-1, 2), depths.reshape(-1), conics.reshape(-1, 3)
    ts = TILE or _tile_size(radii, means.is_cuda)
    plan = _make_plan(m2.detach(), radii.reshape(-1, 2), dep.detach(), cam, C, W, H, ts)
    if absgrad and means2d.requires_grad:
        plan.absgrad_of = means2d
    e = plan.ent
    # index_select, not x[e]: its backward is index_add, much faster than index_put on CPU
    d = m2.index_select(0, e) - plan.centre  # mean relative to the tile centre
    ca, cb, cc = con.index_select(0, e).unbind(-1)
    dx, dy = d.unbind(-1)
    # log alpha(u, v) = log o - maha/2 as a quadratic in the pixel offset (u, v) from the tile centre
    maha = ca * dx * dx + cc * dy * dy + 2.0 * cb * dx * dy
    q0 = torch.log(op.reshape(-1).index_select(0, e)) - 0.5 * maha
    Q = torch.stack([q0, ca * dx + cb * dy, cc * dy + cb * dx, -0.5 * ca, -0.5 * cc, -cb], -1)
    feats = [rgb.reshape(-1, rgb.shape[-1])] + ([dep[:, None]] if render_depth else [])
    feats = torch.cat(feats + [torch.ones_like(dep[:, None])], -1).index_select(0, e)
    Q = torch.cat([Q, Q.new_tensor([[-1e4, 0, 0, 0, 0, 0]])])  # padding slot: alpha = 0
    feats = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
    tiles = _Composite.apply(Q, feats, plan)
    th, tw, D = math.ceil(H / ts), math.ceil(W / ts), feats.shape[1]
    img = tiles.view(C, th, tw, ts, ts, D).permute(0, 1, 3, 2, 4, 5).reshape(C, th * ts, tw * ts, D)
    img = img[:, :H, :W]
    alpha = img[..., -1:]
    out = img[..., : rgb.shape[-1]]
    if bg is not None:
        out = out + bg[:, None, None, :] * (1.0 - alpha)
    depth = img[..., -2:-1] / alpha.clamp_min(1e-10) if render_depth else None
    return RenderOutput(out, alpha, depth, info)


_CPU_WARN_COUNT = 20_000
_cpu_warned = False


def _warn_cpu_render(n: int) -> None:
    """Once per process: a large render on the CPU reference rasterizer while a GPU is there is
    almost always a model left on the CPU, e.g. by Lightning's teardown after ``trainer.fit`` or
    ``trainer.test`` (it takes minutes per frame where gsplat takes milliseconds)."""
    global _cpu_warned
    if not _cpu_warned:
        _cpu_warned = True
        warnings.warn(
            f"rasterize: {n:,} Gaussians rendered on the CPU (the torch reference rasterizer) while CUDA "
            "is available; Lightning moves a module to the CPU after trainer.fit/test: call "
            "model.cuda() first, or pass backend='torch' to render on the CPU on purpose",
            stacklevel=3,
        )


def rasterize(
    gaussians: Gaussians | Mapping[str, Tensor],
    K: Tensor,
    w2c: Tensor,
    width: int,
    height: int,
    *,
    backend: Literal["auto", "gsplat", "torch"] = "auto",
    background: Tensor | None = None,
    near: float = 0.01,
    far: float = 1e10,
    sh_degree: int | None = None,
    eps2d: float = 0.3,
    render_depth: bool = True,
    absgrad: bool = False,
    packed: bool = False,
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
) -> RenderOutput:
    """Render Gaussians into C cameras ``K [C, 3, 3]``, ``w2c [C, 4, 4]`` (OpenCV, see
    ``fourdgen.geometry.cameras``) at ``width`` x ``height``.

    ``gaussians``: a :class:`Gaussians`, or a mapping of tensors in gsplat-trainer form
    (``means``, ``quats``, ``scales`` = log-scales, ``opacities`` = logits, and either ``sh0`` [+
    ``shN``] or post-activation ``colors [N, D]``; ``log_scales``/``opacity_logits`` also accepted),
    e.g. the ParameterDict that gsplat's ``DefaultStrategy`` edits.
    ``background [C, D] | [D]`` is composited under the splats. ``sh_degree``: SH bands to use
    (None: all). ``backend``: "gsplat" (CUDA only), "torch" (anywhere), "auto" (gsplat on CUDA).
    ``rasterize_mode``: gsplat's ``classic`` or ``antialiased`` (opacities scaled by
    :func:`project_gaussians`' compensation: splats smaller than a pixel fade instead of growing).
    """
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"rasterize_mode: expected 'classic' or 'antialiased', got {rasterize_mode!r}")
    *splats, avail = _unpack(gaussians)  # means, quats, scales, opacities, colours
    if sh_degree is None or avail is None:
        sh_degree = avail
    elif sh_degree > avail:
        raise ValueError(f"sh_degree={sh_degree} but the Gaussians only have degree {avail}")
    if background is not None:
        background = background.to(splats[0]).expand(w2c.shape[0], background.shape[-1])
    if backend == "auto":
        backend = "gsplat" if splats[0].is_cuda else "torch"
        if backend == "torch" and splats[0].shape[0] >= _CPU_WARN_COUNT and torch.cuda.is_available():
            _warn_cpu_render(splats[0].shape[0])
    if backend == "torch":
        args = (near, far, eps2d, render_depth, absgrad, packed, rasterize_mode)
        return _rasterize_torch((*splats, sh_degree), K, w2c, width, height, background, *args)
    if backend != "gsplat":
        raise ValueError(f"unknown backend {backend!r}")
    if not splats[0].is_cuda:
        raise RuntimeError("backend='gsplat' needs CUDA tensors; use backend='torch' on CPU")
    from gsplat import rasterization

    mode = "RGB+ED" if render_depth else "RGB"
    kw = dict(
        near_plane=near,
        far_plane=far,
        eps2d=eps2d,
        sh_degree=sh_degree,
        packed=packed,
        absgrad=absgrad,
        rasterize_mode=rasterize_mode,
    )
    img, alpha, info = rasterization(*splats, w2c, K, width, height, render_mode=mode, **kw)
    if info["means2d"].requires_grad:
        info["means2d"].retain_grad()
    info["backend"] = "gsplat"
    rgb = img[..., : img.shape[-1] - int(render_depth)]
    if background is not None:  # here, not in gsplat: its packed mode rejects per-camera backgrounds
        rgb = rgb + background[:, None, None, :] * (1.0 - alpha)
    return RenderOutput(rgb, alpha, img[..., -1:] if render_depth else None, info)
