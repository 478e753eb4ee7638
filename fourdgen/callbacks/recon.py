"""Writes what the feed-forward reconstructor predicts for each clip (``fourdgen predict``):

``<out_dir>/<scene_id>/``: ``gaussians/frame_XXXX.ply`` (one per timestep, all input views'
pixel Gaussians), ``cameras.json`` (predicted ``K`` and ``w2c`` of every input view, in the frame
of the first camera) and ``render_path.mp4`` (renders along a camera path interpolated through
the predicted views while time advances). Every file is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fourdgen.callbacks.guard import GuardedPredictionWriter
from fourdgen.gaussians.ply import save_ply_sequence
from fourdgen.gaussians.rasterize import rasterize
from fourdgen.geometry.interpolation import interpolate_path
from fourdgen.io import write_json
from fourdgen.media import save_video_mp4
from fourdgen.models.gaussian_recon import ReconPrediction

# The first camera's frame is OpenCV (y down): its up direction is -y.
_UP = torch.tensor([0.0, -1.0, 0.0])


class ReconExport(GuardedPredictionWriter):
    """Writes each predicted clip (see the module docstring).

    Args:
        out_dir: output folder (one sub-folder per scene).
        path_samples: cameras on the rendered path (and frames of the mp4).
        closed_path: loop back to the first view (360-degree captures) instead of an open arc.
        fps: frame rate of the mp4.
        min_opacity: PLYs leave out Gaussians below this opacity (one per pixel per view adds up:
            8 views at 350 x 518 are 1.45 M Gaussians a timestep); renders use them all.
    """

    def __init__(
        self,
        out_dir: str = "outputs/recon",
        path_samples: int = 60,
        closed_path: bool = False,
        fps: int = 12,
        min_opacity: float = 0.0,
    ):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.path_samples, self.closed_path, self.fps = path_samples, closed_path, fps
        self.min_opacity = min_opacity

    @torch.no_grad()
    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        pred: ReconPrediction = prediction["pred"]
        H, W = prediction["rgb"].shape[-2:]
        for b in range(pred.K.shape[0]):
            scene = prediction["scene_id"][b] if prediction["scene_id"] else f"clip_{batch_idx:04d}_{b}"
            self.write_clip(
                self.out_dir / scene, pred, b, (H, W), backend=getattr(pl_module.hparams, "backend", "auto")
            )

    def write_clip(
        self, out: Path, pred: ReconPrediction, b: int, hw: tuple[int, int], backend: str = "auto"
    ) -> Path:
        V, T = pred.K.shape[1:3]
        H, W = hw
        gaussians = [pred.at(b, t) for t in range(T)]
        kept = [g.index(g.opacities >= self.min_opacity) if self.min_opacity > 0 else g for g in gaussians]
        save_ply_sequence(out / "gaussians", [g.detach().to("cpu") for g in kept])
        shared = bool(torch.equal(pred.w2c[b], pred.w2c[b, :, :1].expand_as(pred.w2c[b])))
        cams = {
            "convention": "OpenCV w2c, K in pixels (pixel centres at +0.5); world = first input camera",
            "image_size": [H, W],
            "shared_over_time": shared,
            "views": [
                {
                    "view": v,
                    "K": pred.K[b, v, 0].tolist(),
                    "w2c": pred.w2c[b, v, 0].tolist() if shared else pred.w2c[b, v].tolist(),
                }
                for v in range(V)
            ],
        }
        write_json(out / "cameras.json", cams)
        keys = pred.w2c[b, :, 0].float()
        path, _ = interpolate_path(keys, self.path_samples, closed=self.closed_path, up=_UP.to(keys.device))
        K = pred.K[b, 0, 0].float()
        frames = []
        for i, w2c in enumerate(path):
            t = min(T - 1, i * T // len(path))
            frames.append(
                rasterize(gaussians[t], K[None], w2c[None], W, H, backend=backend, render_depth=False).rgb[0]
            )
        save_video_mp4(out / "render_path.mp4", torch.stack(frames).clamp(0, 1).cpu(), fps=self.fps)
        return out
