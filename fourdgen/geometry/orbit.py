"""Cameras placed around a subject seen by one source camera: target views of a multi-view grid
(Full-4D's rig around the input video's subject) and novel-view paths of a dynamic point cloud.

The subject centre is where the source camera looks, at the subject's depth: the median depth of
the image's central region along the optical axis. A target camera is the source camera's centre
rotated about the world up axis through that centre by an azimuth, raised by an elevation angle
and moved to a radius, looking at the centre (OpenCV ``w2c``, :func:`~fourdgen.geometry.cameras.look_at`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fourdgen.geometry.cameras import camera_centers, invert_rigid, look_at
from fourdgen.geometry.rotations import axis_angle_to_matrix


def subject_center(depth: Tensor, w2c: Tensor, central: float = 0.5) -> Tensor:
    """World point ``[3]`` on the optical axis of ``w2c [4, 4]`` at the median valid (> 0) depth of
    the central ``central`` fraction (per side) of ``depth [H, W]``; the whole image if that region
    has no depth."""
    H, W = depth.shape
    h0, w0 = int(H * (1 - central) / 2), int(W * (1 - central) / 2)
    region = depth[h0 : H - h0, w0 : W - w0]
    valid = region[region > 0]
    if valid.numel() == 0:
        valid = depth[depth > 0]
    if valid.numel() == 0:
        raise ValueError("subject_center: the depth map has no positive values")
    d = valid.float().median()
    c2w = invert_rigid(w2c.float())
    return c2w[:3, 3] + d * c2w[:3, 2]  # camera centre + d * optical axis


def orbit_cameras(
    source_w2c: Tensor,
    center: Tensor,
    azimuths_deg: list[float] | Tensor,
    elevation_deg: float = 0.0,
    radius: float | None = None,
    up: Tensor | None = None,
) -> Tensor:
    """Cameras ``[V, 4, 4]`` around ``center [3]``: the source camera ``source_w2c [4, 4]`` rotated
    by each azimuth (degrees, about ``up`` through ``center``; positive turns the camera to its
    right around the subject) and raised by ``elevation_deg``, at ``radius`` from the centre (None:
    the source camera's distance). ``up`` defaults to the source camera's up (OpenCV: its -y).
    Azimuth 0 at elevation 0 and the source's radius is the source camera itself, when it looks at
    ``center``."""
    src = source_w2c.float()
    up = -src[1, :3] if up is None else torch.as_tensor(up, dtype=torch.float32)
    up = up / up.norm()
    eye0 = camera_centers(src)
    offset = eye0 - center
    r = float(offset.norm()) if radius is None else float(radius)
    if r <= 0:
        raise ValueError(f"orbit_cameras: radius must be > 0, got {r}")
    # The horizontal direction from the centre to the source camera, and the axis to tilt about.
    flat = offset - (offset @ up) * up
    flat = flat / flat.norm().clamp_min(1e-8)
    azimuths = torch.as_tensor(azimuths_deg, dtype=torch.float32)
    w2cs = []
    for a in azimuths:
        R = axis_angle_to_matrix(up * math.radians(float(a)))
        d = R @ flat
        side = torch.linalg.cross(up, d)
        tilt = axis_angle_to_matrix(side / side.norm() * math.radians(-elevation_deg))
        eye = center + r * (tilt @ d)
        w2cs.append(look_at(eye, center, up))
    return torch.stack(w2cs)


def swing_path(
    source_w2c: Tensor, center: Tensor, num_samples: int, arc_deg: float = 30.0, elevation_deg: float = 0.0
) -> Tensor:
    """A novel-view path ``[num_samples, 4, 4]`` that swings around ``center`` from the source view
    to ``+arc/2``, back through it to ``-arc/2`` and back (one period, a smooth loop)."""
    s = torch.arange(num_samples, dtype=torch.float32) / max(num_samples, 1)
    azimuths = (arc_deg / 2) * torch.sin(2 * math.pi * s)
    return orbit_cameras(source_w2c, center, azimuths, elevation_deg)
