"""Writes generated multi-view grids (stage 1b) so stages 2 and 3 read them directly.

Per clip, under ``out_dir/<scene_id>/``: ``scene/`` (the grid in the scene format, cameras where
the recipe knows them, placeholders flagged ``"cameras": "unknown"`` otherwise), ``mosaic.mp4``
(all views tiled, one frame per instant) and ``views/view_XX.mp4`` (one video per view). Every
file is written atomically; ``scene.json`` last.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from einops import rearrange
from torch import Tensor

from fourdgen.callbacks.media import save_video_mp4
from fourdgen.data.scene import write_scene
from fourdgen.geometry.cameras import intrinsics_from_fov


def grid_mosaic(rgb: Tensor, cols: int | None = None) -> Tensor:
    """``rgb [V, T, 3, H, W]`` in [0, 1] -> ``[T, rows H, cols W, 3]``: view v in tile
    ``(v // cols, v % cols)``, ``cols = ceil(sqrt(V))`` by default, empty tiles black."""
    V, T, C, H, W = rgb.shape
    cols = cols or math.ceil(math.sqrt(V))
    rows = math.ceil(V / cols)
    tiles = torch.cat([rgb, rgb.new_zeros(rows * cols - V, T, C, H, W)])
    return rearrange(tiles, "(r c) t ch h w -> t (r h) (c w) ch", r=rows, c=cols)


def _check(clip: dict) -> tuple[int, int, int, int]:
    rgb = clip.get("rgb")
    if not isinstance(rgb, Tensor) or rgb.ndim != 5 or rgb.shape[2] != 3:
        got = None if rgb is None else list(getattr(rgb, "shape", []))
        raise ValueError(f"grid clip field 'rgb': expected a tensor [V, T, 3, H, W], got {got}")
    V, T, _, H, W = rgb.shape
    for key, shape in (("K", (V, 3, 3)), ("w2c", (V, T, 4, 4))):
        x = clip.get(key)
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(
                f"grid clip field {key!r}: expected {list(shape)} (rgb is {list(rgb.shape)}), "
                f"got {list(x.shape)}"
            )
    if (clip.get("K") is None) != (clip.get("w2c") is None):
        raise ValueError("grid clip fields 'K' and 'w2c': give both cameras or neither")
    return V, T, H, W


def write_grid(
    clip: dict,
    out_dir: str | Path,
    fps: float = 8.0,
    frame_format: str = "png",
    default_fov_deg: float = 60.0,
) -> Path:
    """Write one generated grid (``scene_id``, ``rgb [V, T, 3, H, W]`` in [-1, 1], ``K [V, 3, 3]`` and
    ``w2c [V, T, 4, 4]`` or None, optional ``caption`` and ``observed [V, T]``). Returns its folder."""
    V, T, H, W = _check(clip)
    out = Path(out_dir) / str(clip.get("scene_id", "grid"))
    rgb = ((clip["rgb"].float().cpu() + 1) / 2).clamp(0, 1)
    extra: dict = {"generated_by": "fourdgen stage 1b"}
    if clip.get("observed") is not None:
        extra["given_cells"] = clip["observed"].bool().cpu().tolist()
    if clip.get("K") is None:
        # Placeholder pinhole cameras so the scene loads; stage 2 infers the real ones.
        K = intrinsics_from_fov(default_fov_deg, W, H).expand(V, 3, 3)
        w2c = torch.eye(4).expand(V, T, 4, 4)
        extra["cameras"] = "unknown"
    else:
        K, w2c = clip["K"].float().cpu(), clip["w2c"].float().cpu()
    for v in range(V):
        save_video_mp4(out / "views" / f"view_{v:02d}.mp4", rgb[v].permute(0, 2, 3, 1), fps=fps)
    save_video_mp4(out / "mosaic.mp4", grid_mosaic(rgb), fps=fps)
    write_scene(
        out / "scene",
        rgb.permute(0, 1, 3, 4, 2),
        K,
        w2c,
        fps=fps,
        caption=clip.get("caption", ""),
        frame_format=frame_format,
        extra=extra,
    )
    return out


class GridVideoWriter(L.pytorch.callbacks.BasePredictionWriter):
    """Write :meth:`GridDiffusion.predict_step` outputs with :func:`write_grid`."""

    def __init__(
        self,
        out_dir: str = "outputs/video/grid",
        fps: float = 8.0,
        frame_format: str = "png",
        default_fov_deg: float = 60.0,
    ):
        super().__init__(write_interval="batch")
        self.out_dir, self.fps, self.frame_format, self.fov = (
            Path(out_dir),
            fps,
            frame_format,
            default_fov_deg,
        )

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        for clip in prediction:
            write_grid(clip, self.out_dir, self.fps, self.frame_format, self.fov)
