"""Scene sizes a Gaussian fit derives from its cameras and initial points.

- :func:`camera_extent`: 3DGS's scene extent (the learning rates of positions and of the
  deformation field scale with it, and so do densification's size thresholds).
- :func:`foreground_bounds`: the box a HexPlane deformation field covers. Its cells are spread
  over this box, so a far background (sky, distant ground) must not stretch it; points outside
  are clamped to its border by the HexPlane.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fourdgen.geometry.cameras import camera_centers, focus_point


def camera_extent(w2c: Tensor) -> Tensor:
    """3DGS's scene extent of cameras ``w2c [N, 4, 4]``: 1.1 x the largest distance of a camera
    centre from their mean (at least 1e-3), a scalar tensor."""
    centers = camera_centers(w2c)
    return 1.1 * (centers - centers.mean(0)).norm(dim=-1).max().clamp_min(1e-3)


def foreground_bounds(
    points: Tensor,
    w2c: Tensor,
    radius: float = 0.75,
    quantile: float = 0.01,
    pad: float = 0.1,
    min_points: int = 16,
) -> tuple[Tensor, Tensor]:
    """Box ``(lo [3], hi [3])`` (float32) around the points the cameras look at.

    Args:
        points: ``[N, 3]`` scene points (e.g. the initial point cloud).
        w2c: ``[V, 4, 4]`` the cameras (e.g. the training rig at its first timestep).
        radius: points within ``radius`` x (mean distance of the cameras to their focus point, see
            :func:`~fourdgen.geometry.cameras.focus_point`) of that focus point are foreground.
            With fewer than ``min_points`` of them, all points are.
        quantile: the box spans the per-axis ``[quantile, 1 - quantile]`` quantiles (linear
            interpolation) of the foreground points, then is padded on each side by ``pad`` x
            its size (each side at least ``pad`` x 1e-3).
    """
    focus = focus_point(w2c)
    r = radius * (camera_centers(w2c) - focus).norm(dim=-1).mean()
    fg = points[(points - focus).norm(dim=-1) < r]
    fg = fg if len(fg) >= min_points else points
    q = torch.tensor([quantile, 1 - quantile])
    lo, hi = torch.quantile(fg.float(), q, dim=0)
    margin = pad * (hi - lo).clamp_min(1e-3)
    return lo - margin, hi + margin
