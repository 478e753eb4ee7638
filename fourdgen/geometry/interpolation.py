"""Camera-path interpolation (Full-4D appendix): orbit a scene through a few key cameras.

Key cameras are ordered by the azimuth of their centres around a scene centre, measured in the
plane perpendicular to the world up direction. Default up is +y, as in
:func:`~fourdgen.geometry.cameras.look_at`; the azimuth is right-handed about ``up`` (counter-
clockwise seen from above) and is zero along the world axis that cyclically follows up's
dominant axis (+z for up=+y, +x for up=+z). Centres follow a cubic spline (periodic for a
closed loop, the first camera appended at the end so the loop closes), orientations a
piecewise SLERP between consecutive key cameras on the same knots. Knots are uniform in the
path parameter s in [0, 1]: key camera k sits at s = k / N (closed) or k / (N - 1) (open).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.interpolate import CubicSpline
from torch import Tensor

from .cameras import camera_centers, make_rigid
from .rotations import matrix_to_quaternion, quaternion_to_matrix, slerp


def _horizontal_basis(up: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal (e1, e2) spanning the plane perpendicular to ``up``, with e1 x e2 = up."""
    up = up / up.norm()
    ref = torch.zeros_like(up)
    ref[(int(up.abs().argmax()) + 1) % 3] = 1.0
    e1 = ref - (ref @ up) * up
    e1 = e1 / e1.norm()
    return e1, torch.linalg.cross(up, e1)


def camera_azimuths(w2c: Tensor, center: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """Azimuth in radians ``[N]`` in (-pi, pi] of the centres of ``w2c [N, 4, 4]`` around ``center [3]``
    (default: the mean camera centre) about ``up [3]`` (default +y); see the module docstring."""
    C = camera_centers(w2c.double())
    center = C.mean(0) if center is None else torch.as_tensor(center, dtype=C.dtype, device=C.device)
    up = torch.tensor([0.0, 1.0, 0.0]) if up is None else torch.as_tensor(up)
    e1, e2 = _horizontal_basis(up.to(C))
    d = C - center
    return torch.atan2(d @ e2, d @ e1)


def sort_by_azimuth(
    w2c: Tensor, center: Tensor | None = None, up: Tensor | None = None, closed: bool = True
) -> Tensor:
    """Order ``[N]`` (long) of cameras ``w2c [N, 4, 4]`` by increasing azimuth.

    Closed loops start at the smallest azimuth. Open arcs start just after the largest angular
    gap between neighbours, so an arc across the +-pi seam is not split in two.
    """
    az = camera_azimuths(w2c, center, up)
    order = torch.argsort(az, stable=True)
    if not closed and len(order) > 1:
        a = az[order]
        gaps = torch.diff(a, append=a[:1] + 2 * math.pi)  # gap after each camera, cyclic
        order = torch.roll(order, -(int(gaps.argmax()) + 1))
    return order


def interpolate_path(
    w2c: Tensor,
    num_samples: int = 120,
    closed: bool = True,
    center: Tensor | None = None,
    up: Tensor | None = None,
    sort: bool = True,
    bc_type: str = "not-a-knot",
) -> tuple[Tensor, Tensor]:
    """Smooth camera path through key cameras ``w2c [N, 4, 4]``.

    Args:
        num_samples: M, the number of output cameras (Full-4D uses 120).
        closed: a loop back to the first camera (periodic spline; samples at s = i / M for
            i < M, so the last sample is one step before the first camera), or an open arc
            (``bc_type`` spline; samples at s = linspace(0, 1, M), both ends included).
        center: ``[3]`` scene centre for the azimuth sort, default the mean camera centre.
        up: ``[3]`` world up direction, default +y.
        sort: sort the key cameras by azimuth (:func:`sort_by_azimuth`); else keep their order.
        bc_type: scipy ``CubicSpline`` boundary condition of open arcs ("natural", ...).

    Returns ``(path [M, 4, 4], order [N])``: the key camera ``w2c[order[k]]`` is reproduced at
    sample ``k * M / N`` (closed) or ``k * (M - 1) / (N - 1)`` (open) whenever that is an
    integer, e.g. every 20th of 120 samples for 6 key cameras on a loop.
    """
    N = w2c.shape[0]
    if w2c.ndim != 3 or N < 1:
        raise ValueError(f"expected key cameras [N, 4, 4] with N >= 1, got {tuple(w2c.shape)}")
    order = sort_by_azimuth(w2c, center, up, closed) if sort and N > 1 else torch.arange(N, device=w2c.device)
    if N == 1:
        return w2c.expand(num_samples, 4, 4).clone(), order
    keys = w2c[order].double()
    C = camera_centers(keys)  # [N, 3]
    q = matrix_to_quaternion(keys[:, :3, :3].transpose(-1, -2))  # c2w orientations, [N, 4]
    if closed:
        C = torch.cat([C, C[:1]])  # loop closure: the spline ends where it started
        q = torch.cat([q, q[:1]])
        s = torch.arange(num_samples, dtype=torch.float64) / num_samples
        spline = CubicSpline(np.linspace(0.0, 1.0, N + 1), C.cpu().numpy(), bc_type="periodic", axis=0)
    else:
        s = torch.linspace(0.0, 1.0, num_samples, dtype=torch.float64)
        spline = CubicSpline(np.linspace(0.0, 1.0, N), C.cpu().numpy(), bc_type=bc_type, axis=0)
    segments = len(C) - 1
    centres = torch.from_numpy(spline(s.numpy())).to(keys.device)

    # Piecewise SLERP on the same knots: segment k spans [k, k+1] / segments.
    x = (s * segments).to(keys.device)
    k = x.floor().long().clamp(0, segments - 1)
    R_c2w = quaternion_to_matrix(slerp(q[k], q[k + 1], x - k))
    R = R_c2w.transpose(-1, -2)
    path = make_rigid(R, -(R @ centres[..., None])[..., 0])
    return path.to(w2c.dtype), order


def interpolate_loop(
    w2c: Tensor, num_samples: int = 120, center: Tensor | None = None, up: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Full-4D's closed orbit: :func:`interpolate_path` with ``closed=True`` and azimuth sort."""
    return interpolate_path(w2c, num_samples, closed=True, center=center, up=up)
