"""Reading ``--input``: an image, a folder of frames, a video file or a scene folder, and the
resampling that fits it to a model (frame count, fps, size). Every choice is returned as a plain
dict for ``generate.json``.

Time: ``T`` frames at the model's ``fps`` from ``start`` seconds, each the source frame nearest
to its instant. A clip shorter than ``(T - 1) / fps`` seconds is stretched (``short: stretch``:
``T`` frames spread over the whole clip, so motion plays faster than it happened) or refused
(``short: error``). Space: resize so the frame covers ``height x width`` (aspect kept, bilinear
with antialiasing), then a centre crop, as the stage DataModules do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio.v2 as iio
import numpy as np
import torch

from fourdgen.data.datamodules import _resize, resize_crop_plan
from fourdgen.data.scene import SCENE_FILE, SceneFormatError, read_scene
from fourdgen.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm")


@dataclass
class Probe:
    """What an input is, read without decoding it all: ``kind`` (image/frames/video/scene),
    ``num_frames``, ``fps`` (None: unknown, e.g. images), ``size`` (width, height)."""

    path: Path
    kind: str
    num_frames: int
    fps: float | None
    size: tuple[int, int]
    files: list[Path]


def _open_video(path: Path):
    try:
        return iio.get_reader(path, format="FFMPEG")
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"--input {path}: cannot open as a video ({type(e).__name__}: {first})") from None


def probe(path: str | Path) -> Probe:
    """Check that ``path`` is a readable input and say what it is. Raises one
    :class:`ConfigError` (or :class:`SceneFormatError` for a broken scene) naming the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--input {path}: no such file or folder")
    if path.is_dir():
        if (path / SCENE_FILE).is_file():
            scene = read_scene(path)  # validates every file it names
            return Probe(path, "scene", scene.num_frames, scene.fps, (scene.width, scene.height), [])
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(
                f"--input {path}: a folder without {SCENE_FILE} or frames ({'/'.join(IMAGE_SUFFIXES)})"
            )
        first = _read_image(files[0])
        for f in files[1:]:
            h, w = _image_size(f)
            if (w, h) != (first.shape[1], first.shape[0]):
                raise ConfigError(
                    f"--input {f}: frame size {w}x{h} differs from {files[0].name}'s "
                    f"{first.shape[1]}x{first.shape[0]}"
                )
        return Probe(path, "frames", len(files), None, (first.shape[1], first.shape[0]), files)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        img = _read_image(path)
        return Probe(path, "image", 1, None, (img.shape[1], img.shape[0]), [path])
    if suffix in VIDEO_SUFFIXES:
        with _open_video(path) as reader:
            meta = reader.get_meta_data()
            try:
                n = reader.count_frames()
                reader.get_data(0)
            except Exception as e:
                raise ConfigError(
                    f"--input {path}: cannot decode its frames ({type(e).__name__}: {e})"
                ) from None
        fps = meta.get("fps")
        if not n or not fps:
            raise ConfigError(f"--input {path}: a video without frames or frame rate (fps {fps}, frames {n})")
        return Probe(path, "video", int(n), float(fps), tuple(meta["size"]), [path])
    known = "/".join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    raise ConfigError(f"--input {path}: unknown kind (expected {known}, a folder of frames or a scene)")


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception as e:
        raise ConfigError(f"--input {path}: cannot read as an image ({type(e).__name__})") from None


def _read_image(path: Path) -> np.ndarray:
    try:
        img = iio.imread(path)
    except Exception as e:
        raise ConfigError(f"--input {path}: cannot read as an image ({type(e).__name__}: {e})") from None
    if img.ndim == 3 and img.shape[-1] == 2:  # gray + alpha
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] < 3 or img.dtype not in (np.uint8, np.uint16) or min(img.shape[:2]) < 1:
        raise ConfigError(
            f"--input {path}: expected an 8- or 16-bit RGB(A) or gray image, got {img.dtype} {img.shape}"
        )
    img = img[..., :3]
    if img.dtype == np.uint16:  # 16-bit PNG: keep the high byte (astype would wrap around)
        img = img >> 8
    return np.ascontiguousarray(img).astype(np.uint8)


def plan_times(
    num_src: int, src_fps: float, T: int, fps: float, start: float = 0.0, short: str = "stretch"
) -> tuple[list[int], dict[str, Any]]:
    """Source frame indices of the ``T`` output frames, and the record of the choice."""
    if short not in ("stretch", "error"):
        raise ConfigError(f"import: short must be 'stretch' or 'error', got {short!r}")
    duration = num_src / src_fps
    need = (T - 1) / fps
    first = int(round(start * src_fps))
    if not 0 <= first < num_src:
        raise ConfigError(f"import: start {start}s is outside the clip ({duration:.2f}s)")
    rec: dict[str, Any] = {
        "source_frames": num_src,
        "source_fps": src_fps,
        "frames": T,
        "fps": fps,
        "start_s": start,
    }
    last_time = (num_src - 1 - first) / src_fps
    if need <= last_time or T == 1:
        times = [start + t / fps for t in range(T)]
        idx = [min(num_src - 1, int(round(s * src_fps))) for s in times]
        rec.update(time_mode="model fps", covered_s=[start, start + need], dropped_after_s=start + need)
    elif short == "stretch":
        idx = np.linspace(first, num_src - 1, T).round().astype(int).tolist()
        rec.update(
            time_mode="stretched: the clip is shorter than T frames at the model fps",
            covered_s=[start, (num_src - 1) / src_fps],
            effective_fps=(T - 1) / max(last_time, 1e-9),
        )
    else:
        raise ConfigError(
            f"--input: {duration:.2f}s from {start}s is shorter than the {T} frames at {fps} fps the model "
            f"takes ({need:.2f}s); pass a longer clip or use short: stretch"
        )
    rec["source_indices"] = idx
    return idx, rec


def read_frames(p: Probe, indices: list[int]) -> np.ndarray:
    """Frames ``[len(indices), H, W, 3]`` uint8 of an image/frames/video input (repeats allowed)."""
    if p.kind == "image":
        img = _read_image(p.path)
        return np.stack([img] * len(indices))
    if p.kind == "frames":
        cache = {i: _read_image(p.files[i]) for i in sorted(set(indices))}
        return np.stack([cache[i] for i in indices])
    if p.kind == "video":
        want, got = set(indices), {}
        try:
            with _open_video(p.path) as reader:
                for i, frame in enumerate(reader):  # sequential decoding: seeking is slow and inexact
                    if i in want:
                        got[i] = np.ascontiguousarray(frame[..., :3])
                    if len(got) == len(want):
                        break
        except ConfigError:
            raise
        except Exception as e:  # a stream that breaks mid-way: imageio-ffmpeg's OSError/RuntimeError
            raise ConfigError(
                f"--input {p.path}: decoding stopped at frame {len(got)} ({type(e).__name__}: {e})"
            ) from None
        missing = sorted(want - set(got))
        if missing:
            raise ConfigError(f"--input {p.path}: frames {missing[:5]} could not be decoded")
        return np.stack([got[i] for i in indices])
    raise ValueError(f"read_frames: no frames to read from a {p.kind}")


def fit_size(frames: np.ndarray, height: int, width: int) -> tuple[np.ndarray, dict[str, Any]]:
    """``frames [N, H0, W0, 3]`` uint8 -> ``[N, height, width, 3]`` uint8 (cover, centre crop)."""
    H0, W0 = frames.shape[1:3]
    size, top_left = resize_crop_plan((H0, W0), (height, width), "center", random.Random(0))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    x = _resize(x, size, top_left, (height, width), "bilinear").clamp(0, 1)
    out = (x * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    rec = {
        "source_size": [W0, H0],
        "resized_to": [size[1], size[0]],
        "crop_left_top": [top_left[1], top_left[0]],
        "size": [width, height],
        "resize": "cover (aspect kept), bilinear + antialias, centre crop",
    }
    return out, rec


def check_scene(p: Probe, frames: int | None, views: int | None) -> dict[str, Any]:
    """A scene passed through: it must hold enough views and frames; record what the stages do."""
    scene = read_scene(p.path)
    if views is not None and scene.num_views < views:
        raise SceneFormatError(
            p.path / SCENE_FILE, "views", f"at least {views} views (the model's)", scene.num_views
        )
    if frames is not None and scene.num_frames < frames:
        raise SceneFormatError(
            p.path / SCENE_FILE, "num_frames", f"at least {frames} frames (the model's)", scene.num_frames
        )
    return {
        "time_mode": "scene passed through: the stage takes its first frames at stride 1",
        "source_frames": scene.num_frames,
        "source_fps": scene.fps,
        "source_size": [scene.width, scene.height],
        "resize": "done by the stage DataModule (cover, centre crop)",
    }
