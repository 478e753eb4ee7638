"""nerfstudio / instant-ngp ``transforms.json`` (and D-NeRF's ``transforms_<split>.json``) -> scene.

The layout (nerfstudio's "data conventions" page; instant-ngp's and D-NeRF's files are the same
shape)::

    {"camera_model": "OPENCV", "fl_x": f, "fl_y": f, "cx": c, "cy": c, "w": W, "h": H,
     "k1": 0, "k2": 0, "p1": 0, "p2": 0,        # or "camera_angle_x" (+ "camera_angle_y")
     "frames": [{"file_path": "images/0001.png",  # relative to the json; D-NeRF omits ".png"
                 "transform_matrix": 4x4,         # camera-to-world, OpenGL axes (x right, y up, z back)
                 "time": 0.0,                     # optional (D-NeRF): normalised time of the frame
                 "fl_x": ..., ...}]}              # optional per-frame intrinsics override the top level

Without ``time`` the frames are one instant seen by N cameras (V=N, T=1); with ``time`` they are a
monocular video (V=1, T=N, sorted by time; the times are kept as ``times``). Intrinsics use the
corner-origin pixel convention of fourdgen, as nerfstudio does (rays through ``i + 0.5``), so they
are copied unchanged. Lens distortion is not undone: non-zero coefficients are kept in
``distortion`` and warned about.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fourdgen.data.scene import SceneFormatError
from fourdgen.geometry.cameras import make_intrinsics
from fourdgen.importers.common import (
    array,
    downscale,
    field,
    load_json,
    number,
    opengl_c2w_to_w2c,
    read_image,
    rigid_w2c,
    write_imported,
)

PINHOLE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "OPENCV", "SIMPLE_RADIAL", "RADIAL")
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="train", help="D-NeRF layout: read transforms_<split>.json")
    p.add_argument("--background", type=float, default=0.0, help="grey level alpha is composited on")


def find_json(src: Path, split: str) -> Path:
    """``src`` itself, or its ``transforms.json``, or its ``transforms_<split>.json``."""
    if src.is_file():
        return src
    for name in ("transforms.json", f"transforms_{split}.json"):
        if (src / name).is_file():
            return src / name
    raise SceneFormatError(src, "<file>", f"a transforms.json or transforms_{split}.json", "none found")


def _image_path(root: Path, rel: Any, file: Path, name: str) -> Path:
    if not isinstance(rel, str):
        raise SceneFormatError(file, name, "a relative image path", repr(rel))
    p = root / rel
    if not p.suffix and not p.is_file():  # D-NeRF / Blender: "./train/r_000" means r_000.png
        p = p.with_suffix(".png")
    return p


def _intrinsics(meta: dict, fm: dict, file: Path, pre: str, W: int, H: int) -> tuple[float, ...]:
    """``(fx, fy, cx, cy)`` of one frame: its own keys, else the file's, else from the FoV."""

    def get(key: str) -> Any:
        return fm.get(key, meta.get(key))

    if get("fl_x") is not None:
        fx = number(get("fl_x"), file, pre + "fl_x" if "fl_x" in fm else "fl_x", positive=True)
        fy = number(get("fl_y") if get("fl_y") is not None else fx, file, "fl_y", positive=True)
    elif get("camera_angle_x") is not None:
        ax = number(get("camera_angle_x"), file, "camera_angle_x", positive=True)
        fx = 0.5 * W / math.tan(0.5 * ax)
        ay = get("camera_angle_y")
        fy = fx if ay is None else 0.5 * H / math.tan(0.5 * number(ay, file, "camera_angle_y", True))
    else:
        raise SceneFormatError(
            file, pre + "fl_x", "fl_x/fl_y or camera_angle_x (here or at the top)", "missing"
        )
    cx = number(get("cx"), file, "cx") if get("cx") is not None else W / 2.0
    cy = number(get("cy"), file, "cy") if get("cy") is not None else H / 2.0
    return fx, fy, cx, cy


def import_scene(
    src: str | Path,
    dst: str | Path,
    *,
    split: str = "train",
    background: float = 0.0,
    downscale_factor: int = 1,
    max_frames: int | None = None,
    frame_format: str = "png",
    fps: float = 30.0,
    overwrite: bool = False,
) -> list[Path]:
    """Import one transforms file into a scene at ``dst``; returns ``[dst]``."""
    file = find_json(Path(src), split)
    meta = load_json(file)
    model = meta.get("camera_model", "PINHOLE") if isinstance(meta, dict) else None
    if model not in PINHOLE_MODELS:
        raise SceneFormatError(file, "camera_model", f"a pinhole model ({', '.join(PINHOLE_MODELS)})", model)
    frames = field(meta, "frames", file, "a non-empty list of frames")
    if not isinstance(frames, list) or not frames:
        raise SceneFormatError(file, "frames", "a non-empty list of frames", repr(frames)[:60])
    timed = [isinstance(f, dict) and "time" in f for f in frames]
    if any(timed) and not all(timed):
        i = timed.index(False)
        raise SceneFormatError(file, f"frames[{i}].time", "a time on every frame (or on none)", "missing")
    order = list(range(len(frames)))
    if all(timed):
        times = [number(f["time"], file, f"frames[{i}].time") for i, f in enumerate(frames)]
        order.sort(key=lambda i: times[i])
    order = order[:max_frames] if max_frames else order

    images, Ks, c2ws = [], [], []
    for i in order:
        fm, pre = frames[i], f"frames[{i}]."
        path = _image_path(
            file.parent, field(fm, "file_path", file, "an image path", pre), file, pre + "file_path"
        )
        img = read_image(path, file, pre + "file_path", background)
        H, W = img.shape[:2]
        for key, size in (("w", W), ("h", H)):
            stated = fm.get(key, meta.get(key))
            if stated not in (None, size):
                where = pre + key if key in fm else key
                raise SceneFormatError(file, where, f"the size of {path.name} ({W}x{H})", stated)
        if images and img.shape != images[0].shape:
            raise SceneFormatError(
                file, pre + "file_path", f"images of one size {images[0].shape[:2]}", img.shape[:2]
            )
        Ks.append(_intrinsics(meta, fm, file, pre, W, H))
        name = pre + "transform_matrix"
        c2w = array(field(fm, "transform_matrix", file, "a 4x4 matrix", pre), file, name, (4, 4))
        rigid_w2c(c2w[None], file, name)  # a scaled or sheared pose names its own frame
        c2ws.append(c2w)
        images.append(img)
    w2c = opengl_c2w_to_w2c(np.stack(c2ws))
    K = make_intrinsics(*torch.tensor(Ks, dtype=torch.float64).unbind(-1))  # [N, 3, 3]
    rgb = np.stack(images)  # [N, H, W, 3]
    extra: dict[str, Any] = {}
    distortion = {k: meta[k] for k in DISTORTION_KEYS if isinstance(meta.get(k), (int, float)) and meta[k]}
    if distortion:
        warnings.warn(f"{file}: lens distortion {distortion} is not undone by the import", stacklevel=2)
        extra["distortion"] = distortion
    if all(timed):  # monocular video: one view, one K
        bad = [j for j in range(len(Ks)) if not np.allclose(Ks[j], Ks[0])]
        if bad:
            raise SceneFormatError(
                file,
                f"frames[{order[bad[0]]}].fl_x",
                "the same intrinsics on every frame of a video",
                Ks[bad[0]],
            )
        rgb, K, w2c = rgb[None], K[:1], w2c[None]
        extra["times"] = [times[i] for i in order]
    else:  # one instant, N cameras
        rgb, w2c = rgb[:, None], w2c[:, None]
    extra["frame_files"] = [str(frames[i]["file_path"]) for i in order]
    rgb, K = downscale(rgb, K, downscale_factor)
    return [
        write_imported(
            dst,
            rgb,
            K,
            w2c,
            source=file,
            fmt="nerfstudio",
            fps=fps,
            extra=extra,
            frame_format=frame_format,
            overwrite=overwrite,
        )
    ]
