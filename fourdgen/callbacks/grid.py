"""Writes generated multi-view grids (stage 1b) so stages 2 and 3 read them directly.

Per clip, under ``out_dir/<scene_id>/``: ``scene/`` (the grid in the scene format, read back with
:func:`~fourdgen.data.scene.read_scene`), ``mosaic.mp4`` (all views tiled, one frame per instant)
and ``views/view_XX.mp4`` (one video per view). Every file is written atomically, ``scene.json``
last, so a folder with a ``scene.json`` is complete.

``scene.json`` extra keys (``Scene.extra``): ``"cameras"`` is ``"known"`` (the recipe's target
cameras, e.g. Full-4D) or ``"unknown"`` (e.g. 4Real-Video-V2: the cameras stored are placeholders,
K from ``default_fov_deg`` and identity w2c, for stage 2 to replace); ``"observed"`` (``[V][T]``
bools, when the clip has it) marks the cells that were given as conditions rather than generated.
The top-level ``"source_view"`` (:attr:`~fourdgen.data.scene.Scene.source_view`, when the clip has
one: Full-4D) is the row that is the input video; that view alone has a depth file, the depth the
projection conditioning used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from fourdgen.callbacks.guard import GuardedPredictionWriter
from fourdgen.data.scene_writer import write_scene
from fourdgen.geometry.cameras import intrinsics_from_fov, is_rigid
from fourdgen.media import save_video_mp4


def grid_mosaic(rgb: Tensor, cols: int | None = None) -> Tensor:
    """Tile the views of a grid: ``rgb [V, T, 3, H, W]`` -> ``[T, rows * H, cols * W, 3]``.

    View ``v`` fills tile ``(v // cols, v % cols)``; ``cols`` defaults to ``ceil(sqrt(V))`` (near
    square), ``rows = ceil(V / cols)``; tiles past the last view are black (zeros).
    """
    if rgb.ndim != 5 or rgb.shape[2] != 3:
        raise ValueError(f"grid_mosaic: expected rgb [V, T, 3, H, W], got {list(rgb.shape)}")
    V, T, C, H, W = rgb.shape
    cols = cols or math.ceil(math.sqrt(V))
    if cols < 1:
        raise ValueError(f"grid_mosaic: cols must be >= 1, got {cols}")
    rows = math.ceil(V / cols)
    tiles = torch.cat([rgb, rgb.new_zeros(rows * cols - V, T, C, H, W)])
    return rearrange(tiles, "(r c) t ch h w -> t (r h) (c w) ch", r=rows, c=cols)


def _shape_error(field: str, expected: str, got: Any, rgb: Tensor | None = None) -> ValueError:
    ctx = f" (rgb is {list(rgb.shape)})" if rgb is not None else ""
    return ValueError(f"grid clip field {field!r}: expected {expected}{ctx}, got {got}")


def check_grid_clip(clip: dict) -> tuple[int, int, int, int]:
    """Validate a ``predict_step`` clip dict before anything is written; returns ``(V, T, H, W)``.

    Raises one ValueError naming the field, the expected and the actual shape.
    """
    if not isinstance(clip, dict):
        raise ValueError(f"grid clip: expected a dict, got {type(clip).__name__}")
    if "scene_id" not in clip:
        raise _shape_error("scene_id", "a string (the output folder name)", "missing")
    rgb = clip.get("rgb")
    if not isinstance(rgb, Tensor) or rgb.ndim != 5 or rgb.shape[2] != 3 or 0 in rgb.shape:
        got = list(rgb.shape) if isinstance(rgb, Tensor) else type(rgb).__name__
        raise _shape_error("rgb", "a tensor [V, T, 3, H, W] in [-1, 1]", got)
    V, T, _, H, W = rgb.shape
    for key, shape in (("K", (V, 3, 3)), ("w2c", (V, T, 4, 4)), ("observed", (V, T))):
        x = clip.get(key)
        if x is None:
            continue
        if not isinstance(x, Tensor) or tuple(x.shape) != shape:
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise _shape_error(key, f"a tensor {list(shape)} or None", got, rgb)
    s, depth = clip.get("source_view"), clip.get("depth")
    if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < V):
        raise _shape_error("source_view", f"an int in [0, {V}) or None", repr(s), rgb)
    if depth is not None:
        if s is None:
            raise ValueError("grid clip field 'depth': it is the source view's depth; give 'source_view' too")
        if not isinstance(depth, Tensor) or tuple(depth.shape) != (T, H, W):
            got = list(depth.shape) if isinstance(depth, Tensor) else type(depth).__name__
            raise _shape_error("depth", f"a tensor {[T, H, W]} (the source view's) or None", got, rgb)
        if not torch.isfinite(depth).all() or (depth < 0).any():
            raise ValueError("grid clip field 'depth': expected finite z-depth >= 0 (0 = unknown)")
    K, w2c = clip.get("K"), clip.get("w2c")
    if (K is None) != (w2c is None):
        raise ValueError("grid clip fields 'K' and 'w2c': give both cameras or neither (None = unknown)")
    if K is not None:
        # read_scene rejects these; fail before writing a scene stage 2 could not load.
        last_row = torch.tensor([0.0, 0.0, 1.0], dtype=K.dtype, device=K.device)
        pinhole = (K[:, 0, 0] > 0) & (K[:, 1, 1] > 0) & (K[:, 1, 0] == 0) & (K[:, 2] == last_row).all(-1)
        if not torch.isfinite(K).all() or not pinhole.all():
            raise ValueError(
                "grid clip field 'K': expected finite pinhole intrinsics (fx, fy > 0, last row [0, 0, 1])"
            )
        if not torch.isfinite(w2c).all() or not is_rigid(w2c.detach().cpu()).all():
            raise ValueError("grid clip field 'w2c': expected finite rigid world-to-camera transforms")
    return V, T, H, W


def placeholder_cameras(V: int, T: int, H: int, W: int, fov_deg: float = 60.0) -> tuple[Tensor, Tensor]:
    """Cameras for a grid whose views are unknown: ``K [V, 3, 3]`` (centred, horizontal FoV
    ``fov_deg``) and identity ``w2c [V, T, 4, 4]`` (float32)."""
    K = intrinsics_from_fov(fov_deg, W, H).float().expand(V, 3, 3).clone()
    return K, torch.eye(4).expand(V, T, 4, 4).clone()


def write_grid(
    clip: dict,
    out_dir: str | Path,
    fps: float = 8.0,
    frame_format: str = "png",
    default_fov_deg: float = 60.0,
    *,
    write_views: bool = True,
    write_mosaic: bool = True,
) -> Path:
    """Write one generated grid under ``out_dir/<scene_id>/``; returns that folder.

    ``clip``: ``scene_id``; ``rgb [V, T, 3, H, W]`` in [-1, 1]; ``K [V, 3, 3]`` and ``w2c [V, T, 4, 4]``
    (OpenCV), or both None when the recipe does not know the cameras; optional ``caption``,
    ``observed [V, T]`` bool, ``source_view`` (int: the input video's row) and ``depth [T, H, W]``
    (that row's depth, written as its depth file). ``frame_format``: the scene's frames (``png``,
    ``jpg`` or ``mp4``).
    """
    V, T, H, W = check_grid_clip(clip)
    out = Path(out_dir) / str(clip["scene_id"])
    rgb = ((clip["rgb"].detach().float().cpu() + 1) / 2).nan_to_num(0.0).clamp(0, 1)  # [V, T, 3, H, W]
    extra: dict[str, Any] = {"generated_by": "fourdgen stage 1b"}
    if clip.get("K") is None:
        K, w2c = placeholder_cameras(V, T, H, W, default_fov_deg)
        extra["cameras"] = "unknown"
    else:
        K, w2c = clip["K"].detach().float().cpu(), clip["w2c"].detach().float().cpu()
        extra["cameras"] = "known"
    if clip.get("observed") is not None:
        extra["observed"] = clip["observed"].bool().cpu().tolist()
    depth = None
    if clip.get("source_view") is not None:
        s = extra["source_view"] = int(clip["source_view"])
        if clip.get("depth") is not None:
            depth = [None] * V  # only the source view has depth
            depth[s] = clip["depth"].detach().float().cpu()
    if write_views:
        for v in range(V):
            save_video_mp4(out / "views" / f"view_{v:02d}.mp4", rgb[v].permute(0, 2, 3, 1), fps=fps)
    if write_mosaic:
        save_video_mp4(out / "mosaic.mp4", grid_mosaic(rgb), fps=fps)
    # The scene goes last: its scene.json marks the clip as complete for stages 2 and 3.
    write_scene(
        out / "scene",
        rgb.permute(0, 1, 3, 4, 2),  # [V, T, H, W, 3]
        K,
        w2c,
        fps=fps,
        caption=str(clip.get("caption") or ""),
        frame_format=frame_format,
        depth=depth,
        extra=extra,
    )
    return out


class GridVideoWriter(GuardedPredictionWriter):
    """Write :meth:`GridDiffusion.predict_step` outputs (a list of clip dicts per batch) with
    :func:`write_grid`.

    Args:
        out_dir: output folder; one sub-folder per ``scene_id``.
        fps: frame rate of the videos and of the scene.
        frame_format: the scene's frames, ``png``, ``jpg`` or ``mp4``.
        write_views: one ``views/view_XX.mp4`` per view.
        write_mosaic: ``mosaic.mp4`` with all views tiled.
        default_fov_deg: horizontal FoV of the placeholder K when the cameras are unknown.
    """

    def __init__(
        self,
        out_dir: str = "outputs/video/grid",
        fps: float = 8.0,
        frame_format: str = "png",
        write_views: bool = True,
        write_mosaic: bool = True,
        default_fov_deg: float = 60.0,
    ):
        super().__init__(write_interval="batch")
        if frame_format not in ("png", "jpg", "mp4"):
            raise ValueError(f"GridVideoWriter: frame_format must be png, jpg or mp4, got {frame_format!r}")
        self.out_dir, self.fps, self.frame_format = Path(out_dir), fps, frame_format
        self.write_views, self.write_mosaic, self.default_fov_deg = write_views, write_mosaic, default_fov_deg

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        for clip in [prediction] if isinstance(prediction, dict) else prediction:
            self.write_clip(clip)

    def write_clip(self, clip: dict) -> Path:
        return write_grid(
            clip,
            self.out_dir,
            self.fps,
            self.frame_format,
            self.default_fov_deg,
            write_views=self.write_views,
            write_mosaic=self.write_mosaic,
        )
