"""The tool steps of ``fourdgen generate``: what runs between the Lightning stages.

- :class:`Import` (``run: import``): ``--input`` into the scene format at the model's size.
- :class:`Depth` (``run: depth``): the source video's depth from a local depth model.
- :class:`Cameras` (``run: cameras``): target cameras around the subject; the grid stage's input.

Each takes its options from the step's ``args`` (typed by ``__init__``, checked by jsonargparse),
says in :meth:`check` what would fail before any step runs, and writes one scene folder
``<step folder>/<scene_id>/`` in :meth:`run`, returning what it chose for ``generate.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fourdgen.data.scene import read_scene
from fourdgen.data.scene_writer import write_scene
from fourdgen.errors import ConfigError
from fourdgen.generate import media
from fourdgen.generate.progress import Bar
from fourdgen.geometry.cameras import intrinsics_from_fov
from fourdgen.geometry.orbit import orbit_cameras, subject_center

# The paper's six views around the subject (Full-4D): the input view and five more, evenly spaced.
SIX_VIEWS = [0.0, 60.0, 120.0, 180.0, 240.0, 300.0]


@dataclass
class ToolContext:
    """What a tool sees: its folder ``out``, the inputs, earlier steps' folders (``steps``), the
    data settings of the Lightning steps (``data``: step name -> resolved ``data.init_args``)."""

    out: Path
    inputs: list[media.Probe]
    scene_id: str
    prompt: str
    steps: dict[str, Path] = field(default_factory=dict)
    data: dict[str, dict[str, Any]] = field(default_factory=dict)

    def sizes(self, step: str, *keys: str) -> list[Any]:
        if step not in self.data:
            raise ConfigError(f"size_from: {step!r} is not a predict/fit step of this pipeline")
        got = [self.data[step].get(k) for k in keys]
        missing = [k for k, v in zip(keys, got, strict=True) if v is None]
        if missing:
            raise ConfigError(f"step {step!r}: data.init_args.{missing[0]} must be set (the imported size)")
        return got

    def scene(self, step: str):
        return read_scene(self.steps[step] / self.scene_id)


class Import:
    """``--input`` -> ``<out>/<scene_id>/``, a scene of the size the ``size_from`` step's data takes.

    Args:
        mode: ``still`` (one image, repeated to T frames; the stage observes the first only),
            ``video`` (a video, frames folder or scene; one view), ``grid`` (4Real-Video-V2: a
            fixed-view video and a freeze-time video, or a scene; V views x T frames, the first
            row and the first column given, the other cells black).
        size_from: the Lightning step whose ``data.init_args`` give ``num_frames``, ``height``,
            ``width`` (and ``num_views`` for ``grid``).
        fps: the model's frame rate (Wan2.1: 16, Wan2.2-TI2V-5B: 24).
        input_fps: frame rate of a folder of frames (None: ``fps``).
        start: seconds of the video skipped first.
        short: a clip shorter than T frames at ``fps``: ``stretch`` over the whole clip, or ``error``.
        fov_deg: horizontal field of view of the (unknown) input camera.
    """

    def __init__(
        self,
        mode: Literal["still", "video", "grid"] = "video",
        size_from: str = "video",
        fps: float = 16.0,
        input_fps: float | None = None,
        start: float = 0.0,
        short: Literal["stretch", "error"] = "stretch",
        fov_deg: float = 60.0,
    ):
        self.mode, self.size_from, self.fps, self.input_fps = mode, size_from, fps, input_fps
        self.start, self.short, self.fov_deg = start, short, fov_deg

    def _want(self, ctx: ToolContext) -> tuple[int, int, int, int]:
        T, H, W = ctx.sizes(self.size_from, "num_frames", "height", "width")
        V = ctx.sizes(self.size_from, "num_views")[0] if self.mode == "grid" else 1
        return V, T, H, W

    def check(self, ctx: ToolContext) -> None:
        V, T, _, _ = self._want(ctx)
        kinds = [p.kind for p in ctx.inputs]
        if self.mode == "grid":
            if kinds != ["scene"] and (len(kinds) != 2 or "scene" in kinds or "image" in kinds):
                raise ConfigError(
                    f"--input: this pipeline takes a fixed-view video and a freeze-time video (two --input "
                    f"values, videos or frame folders) or one scene folder; got {kinds}"
                )
        elif len(kinds) != 1:
            raise ConfigError(f"--input: this pipeline takes one input, got {len(kinds)}")
        elif self.mode == "still" and kinds[0] != "image":
            raise ConfigError(
                f"--input {ctx.inputs[0].path}: this pipeline takes one image, got a {kinds[0]}"
            )
        elif self.mode == "video" and kinds[0] == "image":
            raise ConfigError(f"--input {ctx.inputs[0].path}: this pipeline takes a video, got an image")
        for p in ctx.inputs:
            if p.kind == "scene":
                media.check_scene(p, T, V)
            elif p.kind in ("video", "frames") and self.short == "error":
                media.plan_times(
                    p.num_frames, p.fps or self.input_fps or self.fps, T, self.fps, self.start, "error"
                )

    def _clip(self, p: media.Probe, T: int, H: int, W: int) -> tuple[np.ndarray, dict[str, Any]]:
        if p.kind == "image":
            frames, rec = (
                media.read_frames(p, [0] * T),
                {"time_mode": f"still: the image repeated to {T} frames"},
            )
        else:
            idx, rec = media.plan_times(
                p.num_frames, p.fps or self.input_fps or self.fps, T, self.fps, self.start, self.short
            )
            frames = media.read_frames(p, idx)
        frames, space = media.fit_size(frames, H, W)
        return frames, {"input": str(p.path), "kind": p.kind, **rec, **space}

    def run(self, ctx: ToolContext) -> dict[str, Any]:
        V, T, H, W = self._want(ctx)
        if ctx.inputs[0].kind == "scene":  # passed through as it is
            rec = media.check_scene(ctx.inputs[0], T, V if self.mode == "grid" else None)
            ctx.out.mkdir(parents=True, exist_ok=True)
            os.symlink(ctx.inputs[0].path.resolve(), ctx.out / ctx.scene_id, target_is_directory=True)
            return {"scene": rec, "caption": "the scene's own (--prompt is not used)"}
        K = intrinsics_from_fov(self.fov_deg, W, H)
        if self.mode != "grid":
            frames, rec = self._clip(ctx.inputs[0], T, H, W)
            rgb = frames[None]
            records = [rec]
        else:
            fixed, rec_f = self._clip(ctx.inputs[0], T, H, W)
            sweep = ctx.inputs[1]
            # The freeze-time video is a camera sweep at one instant: its frames are views, spread
            # evenly over the whole clip (no fps applies); its first view is the fixed view's frame 0.
            idx = np.linspace(0, sweep.num_frames - 1, V).round().astype(int).tolist()
            column, space = media.fit_size(media.read_frames(sweep, idx), H, W)
            rgb = np.zeros((V, T, H, W, 3), np.uint8)
            rgb[0] = fixed
            rgb[1:, 0] = column[1:]
            rec_c = {"input": str(sweep.path), "kind": sweep.kind, "source_frames": sweep.num_frames,
                     "time_mode": f"freeze-time sweep: {V} frames evenly spaced as views 0..{V - 1} at t=0 "
                     "(view 0 at t=0 is the fixed-view video's first frame)",
                     "source_indices": idx, **space}  # fmt: skip
            records = [{"role": "fixed_view", **rec_f}, {"role": "freeze_time", **rec_c}]
        write_scene(
            ctx.out / ctx.scene_id,
            rgb,
            K.expand(V, 3, 3).clone(),
            torch.eye(4).expand(V, 4, 4).clone(),
            fps=self.fps,
            caption=ctx.prompt,
            extra={"imported_by": "fourdgen generate", "cameras": "unknown"},
        )
        return {
            "scene": records,
            "camera": f"unknown: identity pose, K from fov_deg {self.fov_deg}, static over time",
            "grid": [V, T, H, W],
        }


class Depth:
    """The source view's depth: a local transformers depth checkpoint (Depth Anything V2, DPT) on
    every frame of ``<scene_from>/<scene_id>`` (view 0), written as that view's depth file.

    A relative model predicts affine-invariant disparity with no reference to fit it to: it is
    inverted with shift 0 and scaled so the clip's median depth is ``median_depth`` (scene units
    are arbitrary; the cameras step places its rig in the same units). A scene that already has
    depth for view 0 keeps it.

    Args:
        model: the checkpoint folder (``config.json``, weights, ``preprocessor_config.json``).
        scene_from: the step whose scene is read.
        median_depth / device / dtype / batch_size: see above and
            :class:`~fourdgen.backbones.depth.DepthEstimator`.
    """

    def __init__(
        self,
        model: str | None = None,
        scene_from: str = "import",
        median_depth: float = 1.0,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 8,
    ):
        self.model, self.scene_from, self.median_depth = model, scene_from, median_depth
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    def check(self, ctx: ToolContext) -> None:
        if ctx.inputs and ctx.inputs[0].kind == "scene" and read_scene(ctx.inputs[0].path).views[0].depth:
            return  # the scene's own depth is used
        if not self.model:
            raise ConfigError("depth.model: a local depth checkpoint folder is needed (--weights depth=PATH)")
        if not (Path(self.model) / "config.json").is_file():
            raise ConfigError(
                f"depth.model: {self.model}: no config.json (a local transformers depth checkpoint)"
            )

    def run(self, ctx: ToolContext) -> dict[str, Any]:
        from fourdgen.backbones.depth import DepthEstimator

        scene = ctx.scene(self.scene_from)
        rgb = scene.load_rgb(0)  # [T, 3, H, W] in [0, 1]
        if scene.views[0].depth is not None:
            depth, how = scene.load_depth(0), "from the scene"
        else:
            est = DepthEstimator(self.model, self.device, self.dtype, self.batch_size)
            bar, preds = Bar("depth", rgb.shape[0], "frames"), []
            for chunk in rgb.split(self.batch_size):  # counted in frames, not batches
                preds.append(est(chunk).cpu())
                bar.update(chunk.shape[0])
            bar.close()
            pred = torch.cat(preds)
            depth = torch.where(pred > 0, 1.0 / pred, 0.0) if est.space == "disparity" else pred.clamp_min(0)
            valid = depth > 0
            if not valid.any():
                raise ValueError(f"depth: {self.model} predicted no positive values for {scene.root}")
            depth = torch.where(valid, depth * (self.median_depth / depth[valid].median()), 0.0)
            how = f"{self.model} ({est.space}; inverted with shift 0, median scaled to {self.median_depth})"
        write_scene(
            ctx.out / ctx.scene_id,
            rgb.permute(0, 2, 3, 1)[None],
            scene.K[:1],
            scene.w2c[:1],
            depth=depth[None],
            fps=scene.fps,
            caption=scene.caption,
            extra={**scene.extra, "depth_from": how},
        )
        return {"depth": how, "median": float(depth[depth > 0].median())}


class Cameras:
    """Target cameras around the subject of view 0 of ``<scene_from>/<scene_id>``: a grid scene of
    ``len(azimuths)`` views whose view 0 is the source (its frames and depth), the others black
    frames (to generate) with zero depth (unknown), all static over time.

    Args:
        azimuths: degrees around the subject, positive to the source camera's right (Full-4D's
            six-view layout by default: 0, 60, ..., 300); the first must be 0, the source.
        elevation: degrees above the source camera's height, for every target view.
        radius: distance of the targets from the subject (None: the source camera's).
        views_from: the grid step; its ``data.init_args.num_views`` must equal ``len(azimuths)``.
        scene_from: the step whose scene (with depth) is read.
    """

    def __init__(
        self,
        azimuths: list[float] | None = None,
        elevation: float = 0.0,
        radius: float | None = None,
        views_from: str | None = "grid",
        scene_from: str = "depth",
    ):
        self.azimuths = list(SIX_VIEWS if azimuths is None else azimuths)
        self.elevation, self.radius, self.views_from, self.scene_from = (
            elevation,
            radius,
            views_from,
            scene_from,
        )

    def check(self, ctx: ToolContext) -> None:
        if not self.azimuths or self.azimuths[0] != 0:
            raise ConfigError(
                f"cameras.azimuths: the first view is the source (azimuth 0), got {self.azimuths}"
            )
        if self.radius is not None and self.radius <= 0:
            raise ConfigError(f"cameras.radius: expected a positive distance or null, got {self.radius}")
        if self.views_from is not None:
            (V,) = ctx.sizes(self.views_from, "num_views")
            if len(self.azimuths) != V:
                raise ConfigError(
                    f"cameras.azimuths: {len(self.azimuths)} views, but step {self.views_from!r} "
                    f"generates data.init_args.num_views = {V}"
                )

    def run(self, ctx: ToolContext) -> dict[str, Any]:
        scene = ctx.scene(self.scene_from)
        depth = scene.load_depth(0)
        if depth is None:
            raise ConfigError(f"cameras: {scene.root} has no depth for view 0 (add a depth step before)")
        src = scene.w2c[0, 0]
        center = subject_center(depth[0], src)
        targets = orbit_cameras(src, center, self.azimuths, self.elevation, self.radius)
        targets[0] = src  # the source keeps its own camera exactly
        V, T = len(self.azimuths), scene.num_frames
        rgb = torch.zeros(V, T, scene.height, scene.width, 3)
        rgb[0] = scene.load_rgb(0).permute(0, 2, 3, 1)
        depths = torch.zeros(V, T, scene.height, scene.width)
        depths[0] = depth
        design = {
            "azimuths_deg": self.azimuths,
            "elevation_deg": self.elevation,
            "radius": float((center - torch.linalg.inv(src)[:3, 3]).norm())
            if self.radius is None
            else self.radius,
            "subject_center": center.tolist(),
        }
        write_scene(
            ctx.out / ctx.scene_id,
            rgb,
            scene.K[:1].expand(V, 3, 3).clone(),
            targets,
            depth=depths,
            fps=scene.fps,
            caption=scene.caption,
            extra={**scene.extra, "cameras": "known", "source_view": 0, "camera_design": design},
        )
        return {"camera_design": design}


TOOLS: dict[str, type] = {"import": Import, "depth": Depth, "cameras": Cameras}
