"""Writes what the video diffusion stage predicts: videos, cameras, depth and point clouds.

Per clip, under ``out_dir/<scene_id>/``: ``rgb.mp4``, ``xyz.mp4`` (pointmaps as colours),
``side_by_side.mp4`` (RGB | XYZ | depth), ``cameras.json`` (K, w2c from post-optimisation),
``depth.npz``, ``points/frame_XXXX.ply`` (coloured point cloud per frame, in the first camera's
frame, pointmap units) and, with ``novel_view_frames``, ``novel_view.mp4``: the dynamic point cloud
rendered along a camera path that swings around the subject while time advances (4DNeX's downstream
use). Every file is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fourdgen.callbacks.guard import GuardedPredictionWriter
from fourdgen.gaussians.ply import save_point_cloud
from fourdgen.geometry.orbit import subject_center, swing_path
from fourdgen.geometry.pointcloud import render_points
from fourdgen.io import atomic_path, write_json
from fourdgen.media import save_video_mp4


def _depth_colors(depth: torch.Tensor) -> torch.Tensor:
    """``[T, H, W]`` -> grey ``[T, H, W, 3]`` in [0, 1], near = bright (one range for the clip)."""
    valid = depth > 0
    lo, hi = (depth[valid].min(), depth[valid].max()) if valid.any() else (0.0, 1.0)
    d = 1 - (depth - lo) / max(float(hi - lo), 1e-6)
    return (d * valid).clamp(0, 1)[..., None].expand(*depth.shape, 3)


@torch.no_grad()
def render_novel_view(
    xyz: torch.Tensor,
    rgb: torch.Tensor,
    K: torch.Tensor,
    w2c: torch.Tensor,
    depth: torch.Tensor,
    num_frames: int,
    arc_deg: float = 30.0,
    radius_px: int = 1,
) -> torch.Tensor:
    """The dynamic point cloud ``xyz [T, H, W, 3]`` coloured by ``rgb [T, H, W, 3]`` (in [0, 1])
    rendered along :func:`~fourdgen.geometry.orbit.swing_path` around the subject of the first
    camera (``K [3, 3]``, ``w2c [T, 4, 4]``, ``depth [T, H, W]``); path sample ``i`` shows time
    ``i * T // num_frames``. Returns ``[num_frames, H, W, 3]`` in [0, 1] (black where no point lands)."""
    T, H, W, _ = xyz.shape
    center = subject_center(depth[0].float(), w2c[0].float())
    path = swing_path(w2c[0].float(), center, num_frames, arc_deg)
    frames = []
    for i, cam in enumerate(path):
        t = min(T - 1, i * T // num_frames)
        image, _, _ = render_points(
            xyz[t].reshape(-1, 3).float(), rgb[t].reshape(-1, 3).float(), K.float(), cam, H, W, radius_px
        )
        frames.append(image.permute(1, 2, 0))
    return torch.stack(frames).clamp(0, 1)


class PointmapVideoWriter(GuardedPredictionWriter):
    """Write :meth:`VideoDiffusion.predict_step` outputs.

    Args:
        out_dir: output folder.
        fps: frame rate of the videos.
        write_points: per-frame PLY point clouds.
        novel_view_frames: frames of ``novel_view.mp4`` (0: none), the point clouds seen from a path
            that swings ``novel_view_arc_deg`` around the subject.
    """

    def __init__(
        self,
        out_dir: str = "outputs/video/predict",
        fps: float = 8.0,
        write_points: bool = True,
        novel_view_frames: int = 0,
        novel_view_arc_deg: float = 30.0,
    ):
        super().__init__(write_interval="batch")
        self.out_dir, self.fps, self.write_points = Path(out_dir), fps, write_points
        self.novel_view_frames, self.novel_view_arc_deg = int(novel_view_frames), float(novel_view_arc_deg)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        for clip in prediction:
            self.write_clip(clip)

    def write_clip(self, clip: dict) -> Path:
        out = self.out_dir / str(clip["scene_id"])
        rgb = ((clip["rgb"].float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # [T, H, W, 3]
        xyz = ((clip["xyz"].float().cpu() + 1) / 2).clamp(0, 1)
        depth = clip["depth"].float().cpu()
        save_video_mp4(out / "rgb.mp4", rgb, fps=self.fps)
        save_video_mp4(out / "xyz.mp4", xyz, fps=self.fps)
        save_video_mp4(
            out / "side_by_side.mp4", torch.cat([rgb, xyz, _depth_colors(depth)], dim=2), fps=self.fps
        )
        write_json(
            out / "cameras.json",
            {"K": clip["K"].cpu().tolist(), "w2c": clip["w2c"].cpu().tolist(), "convention": "opencv"},
        )
        with atomic_path(out / "depth.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, depth=depth.numpy())
        if self.novel_view_frames > 0:
            xyz_pts = clip["xyz"].float().cpu()
            video = render_novel_view(
                xyz_pts,
                rgb,
                clip["K"].float().cpu(),
                clip["w2c"].float().cpu(),
                depth,
                self.novel_view_frames,
                self.novel_view_arc_deg,
            )
            save_video_mp4(out / "novel_view.mp4", video, fps=self.fps)
        if self.write_points:
            for t in range(len(rgb)):
                save_point_cloud(
                    out / "points" / f"frame_{t:04d}.ply",
                    clip["xyz"][t].reshape(-1, 3),
                    rgb[t].reshape(-1, 3),
                )
        return out
