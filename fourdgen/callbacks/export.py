"""Writes a fitted 4D Gaussian scene: PLY per timestep, a fly-through mp4, per-view renders.

Runs at the end of ``fit`` and of ``predict``; every file is written atomically. The folder is
guarded (:class:`~fourdgen.callbacks.guard.GuardedOutput`): a fit checks it before training starts,
and a shorter or debug run never replaces the export of a longer one without ``--overwrite``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from fourdgen.callbacks.guard import GuardedOutput
from fourdgen.errors import OutputExistsError
from fourdgen.gaussians.ply import save_ply_sequence
from fourdgen.io import write_json
from fourdgen.media import save_video_mp4


class Export4DGS(GuardedOutput, L.Callback):
    """Export the scene of a :class:`~fourdgen.stages.fit.Gaussian4DFitter`.

    Args:
        out_dir: output folder (``ply/frame_XXXX.ply``, ``flythrough.mp4``, ``renders/<view>.mp4``,
            ``cameras.json``).
        path_samples: cameras on the interpolated fly-through loop.
        path_loops: times the clip plays during one loop around the scene.
        on_fit_end / on_predict_end: when to export.
    """

    def __init__(
        self,
        out_dir: str = "outputs/scene",
        path_samples: int = 120,
        path_loops: int = 1,
        on_fit_end: bool = True,
        on_predict_end: bool = True,
    ):
        super().__init__()
        self.out_dir = Path(out_dir)
        self.path_samples, self.path_loops = path_samples, path_loops
        self.export_on_fit, self.export_on_predict = on_fit_end, on_predict_end

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before any training: a run that could only be refused at its end says so now.
        self._enabled = True
        if stage == "fit" and self.export_on_fit and trainer.is_global_zero:
            planned = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            self._enabled = self.may_write(trainer, self.out_dir, planned)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.export_on_fit and trainer.is_global_zero and getattr(self, "_enabled", True)):
            return
        step = int(pl_module.trained_steps)
        try:  # checked again with the step reached; refusing here must not stop the final checkpoint
            self.may_write(trainer, self.out_dir, step)
        except OutputExistsError as e:
            rank_zero_warn(
                f"fourdgen: export skipped: {e} The trained scene is in the last checkpoint: export it "
                "with `fourdgen predict --ckpt_path <last.ckpt> --overwrite`."
            )
            return
        self.export(pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = int(pl_module.trained_steps)
        if self.export_on_predict and trainer.is_global_zero and self.may_write(trainer, self.out_dir, step):
            self.export(pl_module)

    @torch.no_grad()
    def export(self, module) -> Path:
        with self.writing(self.out_dir, step=int(module.trained_steps)):
            return self._export(module)

    def _export(self, module) -> Path:
        info, out = module.info, self.out_dir
        times = info.times.tolist()
        save_ply_sequence(out / "ply", [module.export_gaussians(t) for t in times])
        K, path = module.camera_path(self.path_samples)
        n = len(path)
        frames = []
        for i in range(n):
            # Continuous time: the deformation field interpolates between the captured frames.
            s = i * self.path_loops / max(n - 1, 1)
            t = s if self.path_loops == 1 else s % 1.0
            frames.append(
                module.render(t, K[None], path[i : i + 1], deform=module.deformation is not None).rgb[0]
            )
        save_video_mp4(out / "flythrough.mp4", torch.stack(frames).clamp(0, 1).cpu(), fps=max(info.fps, 8))
        dev = module.device
        for v in range(info.K.shape[0]):
            frames = [
                module.render(
                    t,
                    info.K[v : v + 1].to(dev),
                    info.w2c[v, ti : ti + 1].to(dev),
                    deform=module.deformation is not None,
                ).rgb[0]
                for ti, t in enumerate(times)
            ]
            save_video_mp4(
                out / "renders" / f"view_{v:02d}.mp4", torch.stack(frames).clamp(0, 1).cpu(), fps=info.fps
            )
        write_json(
            out / "cameras.json",
            {
                "convention": "OpenCV world-to-camera, K in pixels (fourdgen/geometry/cameras.py)",
                "width": info.width,
                "height": info.height,
                "times": times,
                "flythrough": {"K": K.tolist(), "w2c": path.tolist()},
                "views": {
                    "K": info.K.tolist(),
                    "w2c": info.w2c.tolist(),
                    "train": info.train_views,
                    "holdout": info.holdout_views,
                },
            },
        )
        print(
            f"fourdgen: wrote {len(times)} PLY frames, flythrough.mp4 and per-view renders to {out.resolve()}"
        )
        return out
