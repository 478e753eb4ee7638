"""LLFF's ``poses_bounds.npy``: camera-to-world poses in [down, right, back] axes, plus hwf and bounds.

Layout (LLFF's README, "Using your own poses without running COLMAP"): an ``[N, 17]`` float array;
row ``i`` is a ``3 x 5`` matrix flattened row-major, then ``near, far``. The ``3 x 5`` matrix is
``[R | t | hwf]``: the columns of ``R`` are the camera's down, right and back axes in world
coordinates, ``t`` its centre, ``hwf = (height, width, focal)`` in pixels of the full-size image.
Rows follow the sorted image (or video) names. The principal point is the image centre.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fourdgen.data.scene import SceneFormatError
from fourdgen.geometry.cameras import invert_rigid, make_intrinsics


def read_poses_bounds(file: Path, count: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(c2w_llff [N, 3, 4], hwf [N, 3], bounds [N, 2])`` of a ``poses_bounds.npy``."""
    if not file.is_file():
        raise SceneFormatError(file, "<file>", "an existing poses_bounds.npy", "missing file")
    try:
        arr = np.load(file)
    except (ValueError, OSError) as e:
        raise SceneFormatError(file, "<array>", "a .npy array", f"unreadable ({e})") from e
    if arr.ndim != 2 or arr.shape[1] != 17:
        raise SceneFormatError(
            file, "<array>", "shape [N, 17] (3x5 pose + near, far per camera)", list(arr.shape)
        )
    if count is not None and arr.shape[0] != count:
        raise SceneFormatError(file, "<array>", f"{count} rows, one per camera", arr.shape[0])
    if not np.isfinite(arr).all():
        raise SceneFormatError(file, "<array>", "finite numbers", "NaN or inf")
    mats = arr[:, :15].reshape(-1, 3, 5).astype(np.float64)
    bad = np.flatnonzero((mats[:, :, 4] <= 0).any(-1))
    if len(bad):
        raise SceneFormatError(
            file, f"row {bad[0]}.hwf", "positive height, width and focal", mats[bad[0], :, 4].tolist()
        )
    return mats[:, :, :4], mats[:, :, 4], arr[:, 15:].astype(np.float64)


def llff_to_opencv_w2c(c2w_llff: np.ndarray) -> Tensor:
    """``[N, 3, 4]`` LLFF camera-to-world ([down, right, back] columns) -> OpenCV ``w2c [N, 4, 4]``.

    OpenCV's camera axes are (right, down, forward) = (col 1, col 0, -col 2) of LLFF's.
    """
    c = torch.as_tensor(c2w_llff, dtype=torch.float64)
    c2w = torch.zeros(c.shape[0], 4, 4, dtype=torch.float64)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2] = c[:, :, 1], c[:, :, 0], -c[:, :, 2]
    c2w[:, :3, 3], c2w[:, 3, 3] = c[:, :, 3], 1.0
    return invert_rigid(c2w)


def llff_intrinsics(hwf: np.ndarray, width: int, height: int) -> Tensor:
    """``K [N, 3, 3]`` for images of ``width x height``: the focal scales with the image size."""
    sx, sy = width / hwf[:, 1], height / hwf[:, 0]
    f = torch.as_tensor(hwf[:, 2], dtype=torch.float64)
    return make_intrinsics(f * torch.as_tensor(sx), f * torch.as_tensor(sy), width / 2.0, height / 2.0)
