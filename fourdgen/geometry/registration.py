"""4DNeX's pointmap registration (official ``pm_registration.py``, ``optimise_xyz_batch``): cameras,
shared intrinsics and depth from a generated pointmap clip by plain gradient descent.

Model: pixel (u, v) of frame t sees ``X = R_t K^-1 d_t(u, v) [u, v, 1] + c_t`` (``R_t`` camera-to-world
rotation from a 6D vector, ``c_t`` camera centre). Every quantity is a free parameter: ``fx, fy, cx,
cy`` (shared, start ``1.2 W, 1.2 H, W / 2, H / 2``), per-frame 6D rotation (identity) and centre
(origin), per-pixel depth (starts at ``|X|``, clamped at 1e-4). Loss: mean squared error to the
pointmaps; Adam, lr 5e-3, 1500 steps. One4D's variant is :mod:`fourdgen.geometry.postopt`.

Differences from the official code, all deliberate:
- Pixel centres ``(col + 0.5, row + 0.5)`` (fourdgen's convention, so ``K`` is in it) instead of
  integer coordinates.
- The 6D identity is ``[1, 0, 0, 0, 1, 0]`` (columns e1, e2). The official start, ``eye[:, :2]``
  flattened row-major, is ``[1, 0, 0, 1, 0, 0]``: two equal columns, a degenerate (rank-1) first
  rotation that Adam has to escape.
- The official script registers the decoded pointmaps in [0, 1] with x and y re-centred (``- 0.5``);
  for fourdgen's [-1, 1] pointmaps ``official_frame=True`` applies the same similarity
  (``X / 2 + [0, 0, 0.5]``) before and maps the results back, so cameras come out in the input frame.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fourdgen.geometry.cameras import invert_rigid, make_intrinsics, make_rigid, pixel_centers
from fourdgen.geometry.postopt import PostOpt, PostOptResult
from fourdgen.geometry.rotations import rotation_6d_to_matrix

_OFFICIAL_SCALE, _OFFICIAL_SHIFT = 0.5, (0.0, 0.0, 0.5)  # [-1, 1] -> the official decoded frame


def register_pointmaps(
    xyz: Tensor,
    valid: Tensor | None = None,
    steps: int = 1500,
    lr: float = 5e-3,
    official_frame: bool = True,
) -> PostOptResult:
    """``xyz [T, H, W, 3]`` (``valid [T, H, W]``: pixels in the loss) -> ``K [3, 3]``, ``w2c [T, 4, 4]``,
    ``depth [T, H, W]`` in the input's frame and units. Runs with autograd even under ``no_grad``."""
    with torch.inference_mode(False), torch.enable_grad():
        return _register(xyz.detach().clone().float(), valid, steps, lr, official_frame)


def _register(
    xyz: Tensor, valid: Tensor | None, steps: int, lr: float, official_frame: bool
) -> PostOptResult:
    T, H, W, _ = xyz.shape
    dev = xyz.device
    s, shift = (_OFFICIAL_SCALE, torch.tensor(_OFFICIAL_SHIFT, device=dev)) if official_frame else (1.0, 0.0)
    target = (xyz * s + shift).reshape(T, H * W, 3)
    weight = torch.ones(T, H * W, 1, device=dev) if valid is None else valid.reshape(T, H * W, 1).float()
    pix = torch.cat([pixel_centers(H, W, device=dev), torch.ones(H, W, 1, device=dev)], -1).reshape(1, -1, 3)

    depth = target.norm(dim=-1).clone().requires_grad_(True)  # [T, N]
    f = torch.tensor([1.2 * W, 1.2 * H], device=dev, requires_grad=True)
    c = torch.tensor([W / 2, H / 2], device=dev, requires_grad=True)
    rot6d = torch.tensor([1.0, 0, 0, 0, 1, 0], device=dev).repeat(T, 1).requires_grad_(True)
    centre = torch.zeros(T, 3, device=dev, requires_grad=True)
    opt = torch.optim.Adam([depth, f, c, rot6d, centre], lr=lr)

    def world_points() -> tuple[Tensor, Tensor]:
        rays = torch.cat([(pix[..., :2] - c) / f, pix[..., 2:]], -1)  # K^-1 [u, v, 1], [1, N, 3]
        R = rotation_6d_to_matrix(rot6d)  # camera-to-world [T, 3, 3]
        cam = depth.clamp_min(1e-4)[..., None] * rays  # [T, N, 3]
        return cam @ R.transpose(1, 2) + centre[:, None], R

    loss = torch.zeros(())
    for _ in range(steps):
        X, _ = world_points()
        loss = ((X - target).square() * weight).sum() / (3 * weight.sum()).clamp_min(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, R = world_points()
        c2w = make_rigid(R, (centre - shift) / s)  # back to the input frame: x = (x' - shift) / s
        K = make_intrinsics(f[0], f[1], c[0], c[1])
        d = (depth.clamp_min(1e-4) / s).reshape(T, H, W)
    return PostOptResult(K=K.detach(), w2c=invert_rigid(c2w), depth=d.detach(), loss=loss.item())


class FourDNeXRegistration(PostOpt):
    """4DNeX's registration as a post-optimisation component (:func:`register_pointmaps`).

    Args:
        steps: Adam steps (official: 1500); None: the stage's.
        lr: Adam learning rate for every parameter (official: 5e-3).
        official_frame: register in the official decoded frame (see the module docstring).
    """

    def __init__(self, steps: int | None = 1500, lr: float = 5e-3, official_frame: bool = True):
        self.steps, self.lr, self.official_frame = steps, lr, official_frame

    def __call__(self, xyz: Tensor, valid: Tensor | None = None, steps: int | None = None) -> PostOptResult:
        n = self.steps or steps or 1500
        return register_pointmaps(xyz, valid, steps=n, lr=self.lr, official_frame=self.official_frame)
