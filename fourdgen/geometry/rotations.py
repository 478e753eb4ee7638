"""Rotation helpers: unit quaternions in (w, x, y, z) order, scalar first.

``q = (cos(a/2), sin(a/2) * axis)`` is the right-handed rotation by angle ``a`` about ``axis``;
:func:`quaternion_to_matrix` maps it to the ``R`` with ``R @ v`` rotating column vectors ``v``.
``q`` and ``-q`` are the same rotation; :func:`matrix_to_quaternion` returns the one with w >= 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` of quaternions ``q [..., 4]`` (wxyz; normalised here)."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return R.reshape(*q.shape[:-1], 3, 3)


def matrix_to_quaternion(R: Tensor) -> Tensor:
    """Unit quaternions ``[..., 4]`` (wxyz, w >= 0) of rotation matrices ``R [..., 3, 3]``.

    Shepperd's method: of the four algebraically equivalent formulas (each divides by one of
    4w^2, 4x^2, 4y^2, 4z^2) use, per matrix, the one with the largest divisor, so angles near
    180 degrees (w ~ 0) stay accurate.
    """
    m = R.unbind(-1)  # columns; m[c][..., r] = R[..., r, c]
    m00, m10, m20 = m[0].unbind(-1)
    m01, m11, m21 = m[1].unbind(-1)
    m02, m12, m22 = m[2].unbind(-1)
    # 4*(w^2, x^2, y^2, z^2). The clamp keeps sqrt (and its gradient) finite for the rows not
    # chosen; the chosen one is >= 1 (the four sum to 4), so it is untouched.
    sq = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    ).clamp_min(1e-12)
    # Row k is 4 * q_k * q (times sign), computed with q_k as the pivot.
    cand = torch.stack(
        [
            torch.stack([sq[..., 0], m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, sq[..., 1], m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, sq[..., 2], m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, sq[..., 3]], dim=-1),
        ],
        dim=-2,
    )
    cand = cand / (2 * sq.sqrt()[..., None])
    best = sq.argmax(dim=-1)
    q = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    return standardize_quaternion(q / q.norm(dim=-1, keepdim=True))


def standardize_quaternion(q: Tensor) -> Tensor:
    """Pick the representative with w >= 0 of each quaternion ``q [..., 4]``."""
    return torch.where(q[..., :1] < 0, -q, q)


def quaternion_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product ``a * b`` of quaternions ``[..., 4]`` (rotation b first, then a)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def slerp(q0: Tensor, q1: Tensor, t: Tensor | float, eps: float = 1e-6) -> Tensor:
    """Spherical linear interpolation of unit quaternions ``q0, q1 [..., 4]`` at ``t [...]``.

    Takes the shortest path (flips ``q1`` when ``<q0, q1> < 0``: -q1 is the same rotation);
    falls back to normalised lerp when the two are (nearly) equal, where sin(theta) -> 0.
    Returns ``[..., 4]`` unit quaternions; t=0 gives q0, t=1 gives (+-)q1.
    """
    t = torch.as_tensor(t, dtype=q0.dtype, device=q0.device)[..., None]
    dot = (q0 * q1).sum(-1, keepdim=True)
    q1 = torch.where(dot < 0, -q1, q1)
    dot = dot.abs().clamp(max=1.0)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    near = sin_theta < eps
    safe = torch.where(near, torch.ones_like(sin_theta), sin_theta)
    w0 = torch.where(near, 1 - t, torch.sin((1 - t) * theta) / safe)
    w1 = torch.where(near, t, torch.sin(t * theta) / safe)
    q = w0 * q0 + w1 * q1
    return q / q.norm(dim=-1, keepdim=True)


def axis_angle_to_matrix(v: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` of axis-angle vectors ``v [..., 3]`` (angle = ``|v|``)."""
    angle = v.norm(dim=-1, keepdim=True)
    axis = v / angle.clamp_min(1e-12)
    return quaternion_to_matrix(torch.cat([torch.cos(angle / 2), axis * torch.sin(angle / 2)], -1))


def rotation_6d_to_matrix(d6: Tensor) -> Tensor:
    """Zhou et al. 2019 6D rotations ``[..., 6]`` -> ``[..., 3, 3]``: Gram-Schmidt on the two
    3-vectors ``d6[..., :3]``, ``d6[..., 3:]``; they and their cross product are the columns."""
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (a2 * b1).sum(-1, keepdim=True) * b1, dim=-1)
    return torch.stack([b1, b2, torch.cross(b1, b2, dim=-1)], dim=-1)


def rotation_angle(R: Tensor) -> Tensor:
    """Rotation angle in radians ``[...]`` of ``R [..., 3, 3]`` (in [0, pi])."""
    q = matrix_to_quaternion(R)
    # 2*atan2(|v|, w) is accurate at both small and near-pi angles, unlike acos of the trace.
    return 2 * torch.atan2(q[..., 1:].norm(dim=-1), q[..., 0])
