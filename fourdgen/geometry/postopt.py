"""Post-optimisation: cameras, shared intrinsics and depth from a generated pointmap clip
(One4D section 3.4, eq. 11-12; MonST3R / Geo4D).

Model: pixel (u, v) of frame t sees ``X = R_t^T K^-1 D_t(u, v) [u, v, 1] + o_t`` (``R_t``
world-to-camera rotation, ``o_t`` camera centre). Objective: ``sum ||X - X_pred||`` over valid
pixels + ``w * sum_t (||R_t^T R_{t+1} - I||_F + ||o_{t+1} - o_t||)``.

Choices the paper leaves open (documented here):
- The depth of every pixel has a closed-form optimum for a given camera (project the point onto
  its ray), so it is eliminated (variable projection) instead of optimised; it is returned.
- Initialisation: focal lengths from frame 0 (principal point at the image centre), in closed form
  when the global frame is the first camera, or from an uncalibrated DLT of frame 0 when it is a
  similarity of it (One4D's normalised pointmaps: shifted and scaled); of the two, the one whose
  calibrated camera reprojects frame 0 better. Every camera then starts from a normalised DLT on
  its exact pixel-to-point correspondences.
- Refinement: Adam on (log focal, axis-angle rotation offsets, centres), robust L2-norm residuals.

Post-optimisation is a component the recipe picks (``VideoDiffusion(postopt=...)``): :class:`One4DPostOpt`
here, or 4DNeX's registration (:class:`fourdgen.geometry.registration.FourDNeXRegistration`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fourdgen.components import Recorded
from fourdgen.geometry.cameras import make_intrinsics, make_rigid, pixel_centers
from fourdgen.geometry.rotations import axis_angle_to_matrix


@dataclass
class PostOptResult:
    """``K [3, 3]``, ``w2c [T, 4, 4]`` (world = the pointmaps' frame), ``depth [T, H, W]``, final loss."""

    K: Tensor
    w2c: Tensor
    depth: Tensor
    loss: float


class PostOpt(Recorded):
    """Base of the post-optimisation components: ``component(xyz, valid, steps)`` recovers cameras
    from pointmaps ``xyz [T, H, W, 3]`` in one global frame. ``steps`` is the stage's number of steps,
    used where the component does not fix its own."""

    def __call__(self, xyz: Tensor, valid: Tensor | None = None, steps: int | None = None) -> PostOptResult:
        raise NotImplementedError


def _focal_from_first_frame(xyz0: Tensor, valid0: Tensor, uv: Tensor, c: Tensor) -> Tensor:
    """Least-squares ``fx, fy`` with ``u - cx = fx X / Z`` for frame 0 in its own camera frame."""
    X = xyz0[valid0]
    ratio = X[:, :2] / X[:, 2:].clamp_min(1e-6)
    du = uv[valid0] - c
    return (du * ratio).sum(0) / (ratio * ratio).sum(0).clamp_min(1e-12)


def _focal_from_projective_dlt(X: Tensor, uv: Tensor) -> Tensor:
    """``fx, fy`` of the 3x4 camera fitted to points ``X [N, 3]`` and pixels ``uv [N, 2]`` by a
    Hartley-normalised DLT, RQ-decomposed (valid in any world frame, unlike the closed form)."""
    X, uv = X.double(), uv.double()
    mu, m2 = X.mean(0), uv.mean(0)
    s3 = (X - mu).norm(dim=-1).mean().clamp_min(1e-12) / 3**0.5
    s2 = (uv - m2).norm(dim=-1).mean().clamp_min(1e-12) / 2**0.5
    Xh = torch.cat([(X - mu) / s3, torch.ones_like(X[:, :1])], -1)
    un = (uv - m2) / s2
    zero = torch.zeros_like(Xh)
    A = torch.cat([torch.cat([-Xh, zero, un[:, :1] * Xh], -1), torch.cat([zero, -Xh, un[:, 1:] * Xh], -1)])
    M = torch.linalg.svd(A)[2][-1].reshape(3, 4)[:, :3]  # point shift/scale only touch the 4th column
    M = torch.diag(torch.stack([s2, s2, torch.ones_like(s2)])) @ M  # undo the pixel scaling (up to s3)
    M[:2] += m2[:, None] * M[2:]  # and the pixel shift
    # RQ of M = K R through a QR of the row-reversed transpose
    Q, Rm = torch.linalg.qr(M.flip(0).T)
    K = Rm.T.flip(0).flip(1)
    K = K * torch.sign(torch.diagonal(K))[None]  # positive diagonal
    return torch.stack([K[0, 0], K[1, 1]]).div(K[2, 2]).float()


def _reprojection(rays: Tensor, X: Tensor, w2c: Tensor) -> Tensor:
    """Mean image-plane distance between ``rays [N, 3]`` (z = 1) and points ``X`` seen by ``w2c``."""
    cam = X @ w2c[:3, :3].T + w2c[:3, 3]
    return (cam[:, :2] / cam[:, 2:].clamp_min(1e-9) - rays[:, :2]).norm(dim=-1).mean()


def _initial_focal(xyz0: Tensor, valid0: Tensor, uv: Tensor, c: Tensor, W: int) -> Tensor:
    """Frame 0's focal lengths: the closed form or the DLT's, whichever reprojects better."""
    X, px = xyz0[valid0], uv[valid0]
    best, best_err = torch.full((2,), W / (2 * math.tan(math.radians(30))), device=xyz0.device), math.inf
    for f in (_focal_from_first_frame(xyz0, valid0, uv, c), _focal_from_projective_dlt(X, px).to(X.device)):
        if not (torch.isfinite(f).all() and (f > 0).all()):
            continue
        rays = torch.cat([(px - c) / f, torch.ones_like(px[:, :1])], -1)
        err = float(_reprojection(rays, X, _dlt(rays, X)) * f.mean())  # in pixels
        if err < best_err:
            best, best_err = f, err
    return best


def _dlt(rays: Tensor, X: Tensor) -> Tensor:
    """Camera ``w2c [4, 4]`` from normalised image rays ``[N, 3]`` (z = 1) and world points ``[N, 3]``
    by a Hartley-normalised DLT, projected onto a rigid transform."""
    mu = X.mean(0)
    s = (X - mu).norm(dim=-1).mean().clamp_min(1e-9) / 3**0.5
    Xn = (X - mu) / s
    Xh = torch.cat([Xn, torch.ones_like(Xn[:, :1])], -1)  # [N, 4]
    a, b = rays[:, :1], rays[:, 1:2]
    zero = torch.zeros_like(Xh)
    A = torch.cat([torch.cat([-Xh, zero, a * Xh], -1), torch.cat([zero, -Xh, b * Xh], -1)])  # [2N, 12]
    P = torch.linalg.svd(A.double())[2][-1].reshape(3, 4)
    M = P[:, :3]
    if torch.linalg.det(M) < 0:
        P = -P
        M = P[:, :3]
    U, S, Vh = torch.linalg.svd(M)
    R = U @ Vh
    t = P[:, 3] / S.mean()
    # undo the point normalisation: x_cam = R (X - mu) / s + t  =>  scale back by s
    t = s * t - R @ mu.double()
    return make_rigid(R.float(), t.float())


def recover_cameras(
    xyz: Tensor,
    valid: Tensor | None = None,
    steps: int = 200,
    lr: float = 1e-2,
    smooth_weight: float = 0.01,
    max_points: int = 4096,
    seed: int = 0,
) -> PostOptResult:
    """Recover ``K``, ``w2c`` and depth from pointmaps ``xyz [T, H, W, 3]`` in one global frame
    (``valid [T, H, W]`` marks trusted points). Optimises with autograd even when called under
    ``no_grad``/``inference_mode`` (e.g. from a validation or predict step)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _recover_cameras(
            xyz.clone(), None if valid is None else valid.clone(), steps, lr, smooth_weight, max_points, seed
        )


def _recover_cameras(xyz, valid, steps, lr, smooth_weight, max_points, seed) -> PostOptResult:
    T, H, W, _ = xyz.shape
    xyz = xyz.float()
    valid = torch.ones(T, H, W, dtype=torch.bool, device=xyz.device) if valid is None else valid
    uv = pixel_centers(H, W, device=xyz.device)
    c = torch.tensor([W / 2, H / 2], device=xyz.device)
    f0 = _initial_focal(xyz[0], valid[0], uv, c, W)  # 60 deg FoV when neither estimate is usable
    g = torch.Generator().manual_seed(seed)
    idx = []
    for t in range(T):  # a fixed random subset of valid pixels per frame
        ids = valid[t].flatten().nonzero()[:, 0].cpu()
        idx.append(ids[torch.randperm(len(ids), generator=g)[:max_points]].to(xyz.device))
    n = min(len(i) for i in idx)
    idx = torch.stack([i[:n] for i in idx])  # [T, n]
    pix = uv.reshape(-1, 2)[idx]  # [T, n, 2]
    pts = xyz.reshape(T, -1, 3).gather(1, idx[..., None].expand(-1, -1, 3))  # [T, n, 3]
    rays0 = torch.cat([(pix - c) / f0, torch.ones_like(pix[..., :1])], -1)
    init = torch.stack([_dlt(rays0[t], pts[t]) for t in range(T)])
    R0 = init[:, :3, :3]
    o0 = -(R0.transpose(1, 2) @ init[:, :3, 3:])[..., 0]

    log_f = f0.log().clone().requires_grad_(True)
    rot = torch.zeros(T, 3, device=xyz.device, requires_grad=True)
    centre = o0.clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": [log_f], "lr": lr * 0.1}, {"params": [rot, centre], "lr": lr}])
    scale = (pts - pts.mean(1, keepdim=True)).norm(dim=-1).mean().clamp_min(1e-6)  # residuals in scene units

    def residuals(log_f, rot, centre, pix_, pts_):
        R = axis_angle_to_matrix(rot) @ R0  # [T, 3, 3] world-to-camera
        d_cam = torch.cat([(pix_ - c) / log_f.exp(), torch.ones_like(pix_[..., :1])], -1)
        d = d_cam @ R  # rows: R^T d_cam  -> world directions [T, n, 3]
        depth = ((pts_ - centre[:, None]) * d).sum(-1) / (d * d).sum(-1)
        X = centre[:, None] + depth.clamp_min(1e-6)[..., None] * d
        return X - pts_, R

    loss_val = float("nan")
    for _ in range(steps):
        res, R = residuals(log_f, rot, centre, pix, pts)
        align = res.norm(dim=-1).mean() / scale
        smooth = (R[:-1].transpose(1, 2) @ R[1:] - torch.eye(3, device=R.device)).flatten(1).norm(
            dim=-1
        ).sum() + (centre[1:] - centre[:-1]).norm(dim=-1).sum() / scale
        loss = align + smooth_weight * smooth
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_val = loss.item()
    with torch.no_grad():
        R = axis_angle_to_matrix(rot) @ R0
        f = log_f.exp()
        d_cam = torch.cat([(uv - c) / f, torch.ones_like(uv[..., :1])], -1).reshape(1, -1, 3)
        d = d_cam @ R  # [T, HW, 3]
        depth = ((xyz.reshape(T, -1, 3) - centre[:, None]) * d).sum(-1) / (d * d).sum(-1)
        t_vec = -(R @ centre[..., None])[..., 0]
        w2c = make_rigid(R, t_vec)
    K = make_intrinsics(f[0], f[1], c[0], c[1]).to(xyz.device)
    return PostOptResult(K=K, w2c=w2c, depth=depth.reshape(T, H, W).clamp_min(0), loss=loss_val)


class One4DPostOpt(PostOpt):
    """One4D's global optimisation (:func:`recover_cameras`) as a component.

    Args:
        steps: Adam steps; None (default): the stage's (``val_postopt_steps``, twice that at prediction).
        lr / smooth_weight / max_points: as :func:`recover_cameras`.
    """

    def __init__(
        self, steps: int | None = None, lr: float = 1e-2, smooth_weight: float = 0.01, max_points: int = 4096
    ):
        self.steps, self.lr, self.smooth_weight, self.max_points = steps, lr, smooth_weight, max_points

    def __call__(self, xyz: Tensor, valid: Tensor | None = None, steps: int | None = None) -> PostOptResult:
        return recover_cameras(
            xyz,
            valid,
            steps=self.steps or steps or 200,
            lr=self.lr,
            smooth_weight=self.smooth_weight,
            max_points=self.max_points,
        )
