"""The input cameras of what the viewer shows, read from whichever file the input came with.

fourdgen writes cameras three ways; each is read into one :class:`ViewCameras`:

- the fitter's export (``Export4DGS``): ``{"width", "height", "views": {"K" [V,3,3], "w2c" [V,T,4,4],
  "train"}}``;
- the reconstructor's (``ReconExport``): ``{"image_size": [H, W], "views": [{"K", "w2c"}, ...]}``;
- the pointmap writer's (``PointmapVideoWriter``): ``{"K" [3,3], "w2c" [T,4,4]}``, one moving camera
  (its image size is not stored: the principal point is taken to be the image centre).

Convention as everywhere in fourdgen (:mod:`fourdgen.geometry.cameras`): OpenCV axes, ``K`` in
pixels, ``w2c`` world-to-camera.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fourdgen.errors import FourDGenError
from fourdgen.geometry.cameras import camera_centers, invert_rigid
from fourdgen.geometry.interpolation import interpolate_loop, interpolate_path
from fourdgen.geometry.rotations import matrix_to_quaternion


class ViewerInputError(FourDGenError, ValueError):
    """What ``fourdgen view`` was given is not something it shows; names the path and what it expected."""


@dataclass
class ViewCameras:
    """``K [V, 3, 3]`` pixels, ``w2c [V, Tc, 4, 4]`` (``Tc`` = 1 for fixed cameras, else one pose per
    frame), the image size, a name per view and ``path_views``: the views the fly-through loops
    through (the training views of a fit)."""

    K: Tensor
    w2c: Tensor
    width: int
    height: int
    names: list[str]
    path_views: list[int]

    def __post_init__(self) -> None:
        self.K, self.w2c = self.K.float(), self.w2c.float()
        if self.w2c.ndim == 3:  # one pose per view
            self.w2c = self.w2c[:, None]

    @property
    def num_views(self) -> int:
        return self.K.shape[0]

    def at(self, index: int) -> Tensor:
        """``w2c [V, 4, 4]`` at frame ``index`` (fixed cameras: their one pose)."""
        return self.w2c[:, min(index, self.w2c.shape[1] - 1)]

    def up(self) -> Tensor:
        """The cameras' average up ``[3]`` (OpenCV y points down), as the fitter's camera path takes it."""
        up = -self.w2c[self.path_views, 0, 1, :3].mean(0)
        return up / up.norm().clamp_min(1e-8)

    def fov_y(self, view: int) -> float:
        """Vertical field of view in radians (what viser's frusta and client cameras take)."""
        return 2.0 * math.atan(self.height / (2.0 * float(self.K[view, 1, 1])))

    def extent(self) -> float:
        """A length for sizing frusta and points: the spread of the camera centres (or the distance
        to what one camera looks at, for a single fixed camera)."""
        c = camera_centers(self.w2c.reshape(-1, 4, 4))
        spread = float((c - c.mean(0)).norm(dim=-1).max())
        return spread if spread > 1e-6 else 1.0

    def path(self, num: int) -> tuple[Tensor, Tensor]:
        """The fly-through: ``K [3, 3]``, ``w2c [num, 4, 4]``. Several views: the fitter's loop through
        them (:func:`interpolate_loop`, sorted by azimuth about :meth:`up`); one moving camera: its
        own trajectory, resampled; one fixed camera: that camera."""
        views = self.path_views
        K = self.K[views[0]]
        if len(views) > 1:
            return K, interpolate_loop(self.w2c[views, 0], num_samples=num, up=self.up())[0]
        traj = self.w2c[views[0]]
        if len(traj) > 1:
            return K, interpolate_path(traj, num_samples=num, closed=False, sort=False)[0]
        return K, traj.expand(num, 4, 4).clone()


def pose_wxyz_position(w2c: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Camera-to-world rotation as a quaternion ``[4]`` (wxyz) and the centre ``[3]`` of one
    ``w2c [4, 4]``: what viser's frusta and client cameras take (OpenCV axes there too)."""
    c2w = invert_rigid(w2c.double())
    q = matrix_to_quaternion(c2w[:3, :3])
    return q.numpy().astype(np.float64), c2w[:3, 3].numpy().astype(np.float64)


def _tensor(value, file: Path, field: str, *shapes: tuple[int, ...]) -> Tensor:
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ViewerInputError(f"{file}: field '{field}': expected a numeric array") from e
    ok = any(t.ndim == len(s) and all(a in (b, -1) for b, a in zip(t.shape, s, strict=True)) for s in shapes)
    if not ok or not torch.isfinite(t).all():
        want = " or ".join(str(list(s)).replace("-1", "N") for s in shapes)
        raise ViewerInputError(
            f"{file}: field '{field}': expected finite numbers of shape {want}, got {list(t.shape)}"
        )
    return t


def read_cameras_json(file: Path) -> ViewCameras:
    """One of the three ``cameras.json`` layouts fourdgen writes (module docstring)."""
    try:
        d = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ViewerInputError(f"{file}: not a readable JSON file ({e})") from e
    views = d.get("views") if isinstance(d, dict) else None
    if isinstance(views, dict):  # the fitter's export
        K = _tensor(views.get("K"), file, "views.K", (-1, 3, 3))
        w2c = _tensor(views.get("w2c"), file, "views.w2c", (len(K), -1, 4, 4))
        train = views.get("train") or list(range(len(K)))
        W, H = d.get("width"), d.get("height")
        names = [f"view_{v:02d}" for v in range(len(K))]
    elif isinstance(views, list) and views:  # the reconstructor's
        K = torch.stack([_tensor(v.get("K"), file, f"views[{i}].K", (3, 3)) for i, v in enumerate(views)])
        poses = [
            _tensor(v.get("w2c"), file, f"views[{i}].w2c", (4, 4), (-1, 4, 4)) for i, v in enumerate(views)
        ]
        w2c = torch.stack([p if p.ndim == 3 else p[None] for p in poses])
        H, W = (d.get("image_size") or [None, None])[:2]
        train, names = list(range(len(K))), [f"view_{int(v.get('view', i)):02d}" for i, v in enumerate(views)]
    elif isinstance(d, dict) and "K" in d and "w2c" in d:  # the pointmap writer's: one moving camera
        K = _tensor(d["K"], file, "K", (3, 3))[None]
        w2c = _tensor(d["w2c"], file, "w2c", (-1, 4, 4), (4, 4)).reshape(1, -1, 4, 4)
        W, H = round(2 * float(K[0, 0, 2])), round(2 * float(K[0, 1, 2]))
        train, names = [0], ["camera"]
    else:
        raise ViewerInputError(
            f"{file}: not a cameras.json that fourdgen writes (expected 'views' from the fitter's or the "
            "reconstructor's export, or 'K' and 'w2c' from the pointmap writer)"
        )
    if not all(isinstance(x, int) and x > 0 for x in (W, H)):
        raise ViewerInputError(f"{file}: expected a positive image width and height, got {W} x {H}")
    return ViewCameras(K=K, w2c=w2c, width=W, height=H, names=names, path_views=list(train))
