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
from fourdgen.errors import short_error
from fourdgen.evaluation.readers import read_tum_trajectory


def _load_array(file: Path, fld: str, key: str | None = None) -> np.ndarray:
    """A numeric ``.npy`` array (or array ``key`` of an ``.npz``); anything else (truncated, a
    pickle, no such key, not numbers) is one SceneFormatError naming the file and the field."""
    try:
        if key is None:
            arr = np.load(file)
        else:
            with np.load(file) as z:
                if key not in z:
                    raise SceneFormatError(file, key, f"an array named '{key}'", sorted(z))
                arr = z[key]
    except SceneFormatError:
        raise
    except Exception as e:  # OSError, ValueError (a pickle), EOFError, zipfile.BadZipFile
        raise SceneFormatError(file, fld, "a readable numpy array", short_error(e)) from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub":
        raise SceneFormatError(file, fld, "a real-valued array", f"dtype {getattr(arr, 'dtype', type(arr))}")
    return arr


def read_depth_prediction(pred: Path, seq: str, count: int, hw: tuple[int, int]) -> np.ndarray:
    """``[count, H, W]`` float64 depth of ``seq``, resized (bilinear) to the ground truth's ``hw``."""
    if (pred / f"{seq}.npz").is_file():
        file = pred / f"{seq}.npz"
        d = _load_array(file, "depth", key="depth")
    elif (pred / f"{seq}.npy").is_file():
        file = pred / f"{seq}.npy"
        d = _load_array(file, "depth")
    elif (pred / seq).is_dir():
        file = pred / seq
        files = sorted(file.glob("*.npy"))
        maps = [_load_array(f, "depth") for f in files]
        if any(m.shape != maps[0].shape for m in maps):
            bad = next(f for f, m in zip(files, maps, strict=True) if m.shape != maps[0].shape)
            raise SceneFormatError(bad, "depth", f"the shape of {files[0].name}, {list(maps[0].shape)}")
        d = np.stack(maps) if files else np.zeros((0, 1, 1))
    else:
        raise SceneFormatError(
            pred / seq, "<file>", f"{seq}.npz, {seq}.npy or a folder {seq}/ of .npy", "missing"
        )
    if d.ndim != 3 or d.shape[0] != count or min(d.shape) < 1:
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
        w2c = _load_array(file, "poses")
    else:
        raise SceneFormatError(
            pred / seq, "<file>", f"{seq}.txt (TUM format) or {seq}.npy (w2c [T, 4, 4])", "missing"
        )
    if w2c.shape != (count, 4, 4):
        raise SceneFormatError(file, "poses", f"{count} poses (one per ground-truth frame)", list(w2c.shape))
    if not np.isfinite(w2c).all():
        raise SceneFormatError(file, "poses", "finite values", "NaN or inf")
    return w2c.astype(np.float64)


def _image(f: Path) -> np.ndarray:
    try:
        img = np.asarray(iio.imread(f))
    except Exception as e:  # imageio/PIL: OSError, ValueError, SyntaxError ...
        raise SceneFormatError(f, "<image>", "a readable PNG or JPEG frame", short_error(e)) from None
    if img.ndim == 3 and img.shape[-1] == 2:  # gray + alpha
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] < 3 or img.dtype not in (np.uint8, np.uint16):
        raise SceneFormatError(
            f, "<image>", "an 8- or 16-bit RGB(A) or gray frame", f"{img.dtype} {list(img.shape)}"
        )
    img = img[..., :3]
    return (img >> 8).astype(np.uint8) if img.dtype == np.uint16 else img


def read_frames(path: Path, count: int | None = None) -> np.ndarray:
    """RGB frames ``[T, H, W, 3]`` uint8 of an image folder or an mp4 (``count``: expected T)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        images = [_image(f) for f in files]
        bad = [f for f, im in zip(files, images, strict=True) if im.shape != images[0].shape]
        if bad:
            raise SceneFormatError(bad[0], "<image>", f"the size of {files[0].name}, {list(images[0].shape)}")
        frames = np.stack(images) if files else np.zeros((0, 1, 1, 3), np.uint8)
    elif path.suffix.lower() == ".mp4" and path.is_file():
        try:
            with iio.get_reader(path, format="FFMPEG") as r:
                frames = np.stack([f[..., :3] for f in r])
        except Exception as e:  # imageio-ffmpeg: OSError, RuntimeError, StopIteration ...
            raise SceneFormatError(path, "<video>", "a readable .mp4 video", short_error(e)) from None
    else:
        raise SceneFormatError(path, "<file>", "a folder of frames or an .mp4", "missing")
    if count is not None and frames.shape[0] != count:
        raise SceneFormatError(path, "<frames>", f"{count} frames", frames.shape[0])
    return frames
