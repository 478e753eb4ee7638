"""The fly-through: a source rendered on the server along its interpolated camera path, to mp4.

Gaussians go through the project's rasterizer (gsplat on CUDA, the pure-torch one on CPU), with all
their spherical harmonics; point clouds through the z-buffer point splatter that the pointmap
writer's novel view uses. Time runs from 0 to 1 over the path, as in the fitter's export.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from fourdgen.gaussians.rasterize import rasterize
from fourdgen.geometry.pointcloud import render_points
from fourdgen.media import save_video_mp4
from fourdgen.viewer.cameras import ViewerInputError
from fourdgen.viewer.sources import Source


@torch.no_grad()
def render_frame(
    source: Source, t: float, K: Tensor, w2c: Tensor, device: str | torch.device = "cpu"
) -> Tensor:
    """``source`` at time ``t`` seen by ``K [3, 3]``, ``w2c [4, 4]`` at the cameras' image size:
    ``[H, W, 3]`` in [0, 1]."""
    cams, frame = source.cameras, source.frame(t)
    W, H = cams.width, cams.height
    bg = source.background.to(device)
    K, w2c = K.to(device).float(), w2c.to(device).float()
    if frame.gaussians is not None:
        out = rasterize(
            frame.gaussians.to(device), K[None], w2c[None], W, H, background=bg, render_depth=False
        )
        return out.rgb[0].clamp(0, 1)
    image, _, _ = render_points(
        frame.points.to(device), frame.colors.to(device), K, w2c, H, W, radius_px=1, background=bg
    )
    return image.permute(1, 2, 0).clamp(0, 1)


def render_flythrough(
    source: Source,
    num: int = 120,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """``num`` frames ``[num, H, W, 3]`` in [0, 1] along ``source.cameras.path(num)``."""
    if source.cameras is None:
        raise ViewerInputError(f"{source.path}: no cameras (cameras.json) to build a fly-through path from")
    K, path = source.cameras.path(num)
    frames = []
    for i in range(num):
        frames.append(render_frame(source, i / max(num - 1, 1), K, path[i], device).cpu())
        if progress is not None:
            progress(i + 1, num)
    return torch.stack(frames)


def write_flythrough(
    source: Source,
    out: str | Path,
    num: int = 120,
    fps: float | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """:func:`render_flythrough` written atomically to ``out`` (an mp4); returns its path."""
    video = render_flythrough(source, num, device, progress)
    return Path(save_video_mp4(out, video, fps=fps or max(source.fps, 8)))
