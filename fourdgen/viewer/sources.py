"""What the viewer shows, behind one interface: a :class:`Source` gives the :class:`Frame` at a time.

- :class:`FitterSource`: a stage-3 scene (a loaded checkpoint, or the live copy of a fit): the
  deformation field evaluated at any time in [0, 1] (``continuous``).
- :class:`PlyFolderSource`: one PLY per timestep, 3DGS Gaussians (the fitter's export, the
  reconstructor's) or coloured points (the pointmap writer's).
- :class:`SceneFolderSource`: a scene folder: its frames on the cameras and, where it has depth or
  xyz, its pixels lifted to points.

Times are normalised, ``t in [0, 1]`` (frame ``i`` of ``T`` is ``t = i / (T - 1)``), as in the fitter.
Discrete sources show the nearest frame.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData
from torch import Tensor

from fourdgen.data.scene import Scene
from fourdgen.gaussians.container import Gaussians
from fourdgen.gaussians.ply import load_ply
from fourdgen.geometry.projection import depth_to_points
from fourdgen.viewer.cameras import ViewCameras, ViewerInputError

FRAME_FILE = re.compile(r"(?:.*_)?(\d+)\.ply$")


@dataclass
class Frame:
    """The scene at one time: ``gaussians`` (N), or ``points [N, 3]`` with ``colors [N, 3]`` in [0, 1]."""

    gaussians: Gaussians | None = None
    points: Tensor | None = None
    colors: Tensor | None = None

    def __len__(self) -> int:
        return len(self.gaussians) if self.gaussians is not None else len(self.points)


class LRU:
    """A few decoded frames (a PLY at 120k Gaussians is ~28 MB with SH degree 3: not all of them)."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key, make):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


class Source:
    """Base: ``kind``, ``path``, ``num_frames``, ``fps``, ``continuous``, ``cameras`` (or None),
    ``background [3]`` (of server renders) and :meth:`frame`."""

    kind: str = ""
    path: Path
    num_frames: int = 1
    fps: float = 8.0
    continuous: bool = False
    cameras: ViewCameras | None = None
    background: Tensor = torch.zeros(3)

    def index(self, t: float) -> int:
        """The frame nearest to time ``t``."""
        return min(self.num_frames - 1, max(0, round(float(t) * (self.num_frames - 1))))

    def frame(self, t: float) -> Frame:
        raise NotImplementedError

    def view_images(self, index: int) -> list[np.ndarray] | None:
        """The input views' images ``[H, W, 3]`` uint8 at frame ``index``, when the source has them."""
        return None

    def describe(self) -> str:
        return f"{self.kind} {self.path} ({self.num_frames} frames at {self.fps:g} fps)"


class FitterSource(Source):
    """A :class:`~fourdgen.stages.fit.Gaussian4DFitter` (duck-typed: ``export_gaussians(t)``, ``bg``,
    ``info``). ``lock`` guards it against a concurrent update (the live viewer's copy)."""

    kind = "checkpoint"
    continuous = True

    def __init__(self, module, path: Path | str, lock: threading.Lock | None = None, names=None):
        info = module.info
        self.module, self.path, self.lock = module, Path(path), lock or threading.Lock()
        self.num_frames, self.fps = len(info.times), float(info.fps)
        self.background = module.bg.detach().float().cpu()
        views = list(range(len(info.K)))
        self.cameras = ViewCameras(
            K=info.K.cpu(),
            w2c=info.w2c.cpu(),
            width=info.width,
            height=info.height,
            names=names or [f"view_{v:02d}" for v in views],
            path_views=list(info.train_views) or views,
        )

    @torch.no_grad()
    def frame(self, t: float) -> Frame:
        with self.lock:  # the deformation field at t, as the fitter's PLY export evaluates it
            return Frame(gaussians=self.module.export_gaussians(float(t)))


def ply_frames(folder: Path) -> list[Path]:
    """``folder``'s per-frame PLYs (``frame_0000.ply``, ...), ordered by their number."""
    found = [(int(m.group(1)), p) for p in folder.glob("*.ply") if (m := FRAME_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def ply_kind(path: Path) -> str:
    """The kind of a per-frame PLY: ``gaussians`` (3DGS properties) or ``points`` (x y z red green
    blue), from its header."""
    try:
        ply = PlyData.read(str(path), mmap=True)
        names = {p.name for p in ply["vertex"].properties}
    except Exception as e:  # plyfile raises assorted errors on garbled files
        raise ViewerInputError(f"{path}: not a readable PLY file with a 'vertex' element ({e})") from e
    if {"f_dc_0", "opacity", "scale_0", "rot_0"} <= names:
        return "gaussians"
    if {"x", "y", "z", "red", "green", "blue"} <= names:
        return "points"
    raise ViewerInputError(
        f"{path}: PLY vertex properties are neither 3DGS Gaussians (f_dc_*, opacity, scale_*, rot_*) "
        f"nor coloured points (x y z red green blue): {sorted(names)}"
    )


def load_point_cloud(path: Path) -> tuple[Tensor, Tensor]:
    """``points [N, 3]``, ``colors [N, 3]`` in [0, 1] of a coloured point-cloud PLY."""
    v = PlyData.read(str(path))["vertex"]
    pts = np.stack([np.asarray(v[k], dtype=np.float32) for k in "xyz"], 1)
    rgb = np.stack([np.asarray(v[k], dtype=np.float32) for k in ("red", "green", "blue")], 1)
    scale = 255.0 if v["red"].dtype.kind in "ui" else 1.0
    return torch.from_numpy(pts), torch.from_numpy(rgb / scale)


class PlyFolderSource(Source):
    """Per-frame PLYs ``files`` (all Gaussians or all points), with ``cameras`` if found."""

    def __init__(self, folder: Path, files: list[Path], cameras: ViewCameras | None, fps: float):
        kinds = {ply_kind(p) for p in (files[0], files[-1])}
        if len(kinds) > 1:
            raise ViewerInputError(f"{folder}: its PLYs mix Gaussians and point clouds")
        self.path, self.files, self.cameras, self.fps = folder, files, cameras, fps
        self.num_frames, self.points = len(files), kinds == {"points"}
        self.kind = "point-ply" if self.points else "gaussian-ply"
        self._cache = LRU(8)

    def frame(self, t: float) -> Frame:
        i = self.index(t)
        return self._cache.get(i, lambda: self._read(self.files[i]))

    def _read(self, file: Path) -> Frame:
        if self.points:
            points, colors = load_point_cloud(file)
            return Frame(points=points, colors=colors)
        return Frame(gaussians=load_ply(file))


class SceneFolderSource(Source):
    """A scene: every view's frame at the time on its camera, and (with depth or xyz) every view's
    pixels lifted to world points, ``max_points`` at most (a fixed subset: no flicker)."""

    kind = "scene"

    def __init__(self, scene: Scene, max_points: int = 300_000):
        self.scene, self.path, self.max_points = scene, scene.root, max_points
        self.num_frames, self.fps = scene.num_frames, scene.fps
        self.cameras = ViewCameras(
            K=scene.K,
            w2c=scene.w2c,
            width=scene.width,
            height=scene.height,
            names=[v.name for v in scene.views],
            path_views=list(range(scene.num_views)),
        )
        self._cache, self._images = LRU(8), LRU(8)

    def frame(self, t: float) -> Frame:
        i = self.index(t)
        return self._cache.get(i, lambda: self._points(i))

    def _points(self, i: int) -> Frame:
        s, pts, cols = self.scene, [], []
        for v in range(s.num_views):
            xyz = s.load_xyz(v, [i])
            if xyz is None and s.views[v].depth is not None:
                depth = s.load_depth(v, [i])
                xyz = torch.where((depth > 0)[..., None], depth_to_points(depth, s.K[v], s.w2c[v, i]), np.nan)
            if xyz is None:
                continue
            ok = torch.isfinite(xyz[0]).all(-1)
            pts.append(xyz[0][ok])
            cols.append(s.load_rgb(v, [i])[0].permute(1, 2, 0)[ok])
        if not pts:
            return Frame(points=torch.zeros(0, 3), colors=torch.zeros(0, 3))
        points, colors = torch.cat(pts), torch.cat(cols)
        if len(points) > self.max_points:
            keep = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[: self.max_points]
            points, colors = points[keep.sort().values], colors[keep.sort().values]
        return Frame(points=points, colors=colors)

    def view_images(self, index: int) -> list[np.ndarray]:
        def load():
            frames = [self.scene.load_rgb(v, [index])[0] for v in range(self.scene.num_views)]
            return [(f.permute(1, 2, 0) * 255).round().byte().numpy() for f in frames]

        return self._images.get(index, load)
