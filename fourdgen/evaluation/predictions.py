"""Reading a method's predictions for one sequence, in the layouts ``fourdgen eval`` accepts.

- depth: ``<pred>/<seq>.npz`` (key ``depth``) or ``<pred>/<seq>.npy``, ``[T, H, W]``; or a folder
  ``<pred>/<seq>/`` of per-frame ``[H, W]`` ``.npy`` files (sorted by name).
- cameras: ``<pred>/<seq>.txt`` (TUM format, camera-to-world) or ``<pred>/<seq>.npy`` (OpenCV
  ``w2c [T, 4, 4]``).
- frames: a folder of images (sorted by name) or an ``.mp4``.
"""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as iio
import numpy as np
import torch
import torch.nn.functional as F

from fourdgen.data.scene import IMAGE_SUFFIXES, SceneFormatError
from fourdgen.evaluation.readers import read_tum_trajectory


def read_depth_prediction(pred: Path, seq: str, count: int, hw: tuple[int, int]) -> np.ndarray:
    """``[count, H, W]`` float64 depth of ``seq``, resized (bilinear) to the ground truth's ``hw``."""
    if (pred / f"{seq}.npz").is_file():
        file = pred / f"{seq}.npz"
        with np.load(file) as z:
            if "depth" not in z:
                raise SceneFormatError(file, "depth", "an array named 'depth' [T, H, W]", sorted(z))
            d = z["depth"]
    elif (pred / f"{seq}.npy").is_file():
        file = pred / f"{seq}.npy"
        d = np.load(file)
    elif (pred / seq).is_dir():
        file = pred / seq
        files = sorted(file.glob("*.npy"))
        d = np.stack([np.load(f) for f in files]) if files else np.zeros((0, 1, 1))
    else:
        raise SceneFormatError(
            pred / seq, "<file>", f"{seq}.npz, {seq}.npy or a folder {seq}/ of .npy", "missing"
        )
    if d.ndim != 3 or d.shape[0] != count:
        raise SceneFormatError(
            file, "depth", f"[{count}, H, W] (one map per ground-truth frame)", list(d.shape)
        )
    t = torch.as_tensor(d.astype(np.float64))
    if tuple(t.shape[1:]) != hw:
        t = F.interpolate(t[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]
    return t.numpy()


def read_camera_prediction(pred: Path, seq: str, count: int) -> np.ndarray:
    """OpenCV ``w2c [count, 4, 4]`` of ``seq``."""
    if (pred / f"{seq}.txt").is_file():
        file = pred / f"{seq}.txt"
        w2c = read_tum_trajectory(file)[1]
    elif (pred / f"{seq}.npy").is_file():
        file = pred / f"{seq}.npy"
        w2c = np.load(file)
    else:
        raise SceneFormatError(
            pred / seq, "<file>", f"{seq}.txt (TUM format) or {seq}.npy (w2c [T, 4, 4])", "missing"
        )
    if w2c.shape != (count, 4, 4):
        raise SceneFormatError(file, "poses", f"{count} poses (one per ground-truth frame)", list(w2c.shape))
    return w2c.astype(np.float64)


def read_frames(path: Path, count: int | None = None) -> np.ndarray:
    """RGB frames ``[T, H, W, 3]`` uint8 of an image folder or an mp4 (``count``: expected T)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        frames = (
            np.stack([iio.imread(f)[..., :3] for f in files]) if files else np.zeros((0, 1, 1, 3), np.uint8)
        )
    elif path.suffix.lower() == ".mp4" and path.is_file():
        with iio.get_reader(path, format="FFMPEG") as r:
            frames = np.stack([f[..., :3] for f in r])
    else:
        raise SceneFormatError(path, "<file>", "a folder of frames or an .mp4", "missing")
    if count is not None and frames.shape[0] != count:
        raise SceneFormatError(path, "<frames>", f"{count} frames", frames.shape[0])
    return frames
