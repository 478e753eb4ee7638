"""Writes scenes in the format :mod:`fourdgen.data.scene` reads: frames, cameras, depth, xyz, masks.

Every file is written atomically (:func:`fourdgen.io.atomic_path`), ``scene.json`` last, so a
reader never sees a half-written scene.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import imageio.v2 as iio
import numpy as np
import torch
from torch import Tensor

from fourdgen.data.scene import FORMAT_NAME, FORMAT_VERSION, SCENE_FILE
from fourdgen.io import atomic_path, write_json

# A per-view array for all views ([V, ...]), or per view for some views only (None: no file).
PerView = Tensor | np.ndarray | list | tuple | dict | None


def write_scene(
    root: str | Path,
    rgb: Tensor | np.ndarray,
    K: Tensor,
    w2c: Tensor,
    *,
    depth: PerView = None,
    xyz: PerView = None,
    mask: PerView = None,
    fps: float = 8.0,
    caption: str = "",
    frame_format: str = "png",
    view_names: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a scene folder; every file is written atomically, ``scene.json`` last.

    Args:
        rgb: ``[V, T, H, W, 3]`` uint8, or float in [0, 1].
        K: ``[V, 3, 3]``; w2c: ``[V, T, 4, 4]`` (or ``[V, 4, 4]`` for static cameras).
        depth: ``[V, T, H, W]``; xyz: ``[V, T, H, W, 3]`` world points; mask: ``[V, T, H, W]`` ids.
            Each may also be given per view, for some views only: a list of V entries (``[T, H, W]``
            / ``[T, H, W, 3]`` arrays, or None for a view without that file), or a dict
            ``{view: array}``.
        frame_format: ``png``, ``jpg`` or ``mp4`` (one video per view; lossy).

    Raises ValueError (before anything is written) for a wrongly shaped camera or array.
    """
    root = Path(root)
    rgb = _as_uint8(rgb)
    V, T, H, W, _ = rgb.shape
    w2c = torch.as_tensor(w2c, dtype=torch.float64)
    w2c = w2c[:, None].expand(V, T, 4, 4) if w2c.ndim == 3 else w2c
    if tuple(K.shape) != (V, 3, 3) or tuple(w2c.shape) != (V, T, 4, 4):
        raise ValueError(
            f"write_scene: expected K [{V}, 3, 3] and w2c [{V}, {T}, 4, 4], "
            f"got {list(K.shape)} and {list(w2c.shape)}"
        )
    arrays = {
        key: _per_view(arr, key, V, shape)
        for key, arr, shape in (
            ("depth", depth, (T, H, W)),
            ("xyz", xyz, (T, H, W, 3)),
            ("mask", mask, (T, H, W)),
        )
    }
    names = view_names or [f"cam{v:02d}" for v in range(V)]
    views = []
    for v, name in enumerate(names):
        if frame_format == "mp4":
            rel: Any = f"rgb/{name}.mp4"
            write_video(root / rel, rgb[v], fps)
        elif frame_format in ("png", "jpg"):
            rel = [f"rgb/{name}/{t:04d}.{frame_format}" for t in range(T)]
            for t, r in enumerate(rel):
                with atomic_path(root / r) as tmp:
                    iio.imwrite(
                        tmp, rgb[v, t], format=frame_format.upper() if frame_format == "png" else "JPEG"
                    )
        else:
            raise ValueError(f"write_scene: frame_format must be png, jpg or mp4, got {frame_format!r}")
        vm: dict[str, Any] = {
            "name": name,
            "K": torch.as_tensor(K[v]).tolist(),
            "w2c": w2c[v].tolist(),
            "rgb": rel,
        }
        for key, dtype in (("depth", np.float32), ("xyz", np.float32), ("mask", np.uint8)):
            arr = arrays[key][v]
            if arr is not None:
                vm[key] = f"{key}/{name}.npy"
                with atomic_path(root / vm[key]) as tmp, open(tmp, "wb") as f:
                    np.save(f, arr.astype(dtype))
        views.append(vm)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "width": W,
        "height": H,
        "num_frames": T,
        "fps": float(fps),
        "caption": caption,
        "views": views,
        **(extra or {}),
    }
    write_json(root / SCENE_FILE, meta)
    return root


def _per_view(arr: PerView, key: str, V: int, shape: tuple[int, ...]) -> list[np.ndarray | None]:
    """``arr`` as V per-view arrays of ``shape`` (None: the view has no such file), checked."""
    if arr is None:
        return [None] * V
    if isinstance(arr, dict):
        bad = [k for k in arr if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < V]
        if bad:
            raise ValueError(f"write_scene: {key}: view keys must be ints in [0, {V}), got {bad}")
        arr = [arr.get(v) for v in range(V)]
    elif isinstance(arr, (list, tuple)):
        if len(arr) != V:
            raise ValueError(f"write_scene: {key}: expected {V} per-view entries, got {len(arr)}")
    else:
        a = _np(arr)
        if a.shape != (V, *shape):
            raise ValueError(f"write_scene: {key}: expected {[V, *shape]}, got {list(a.shape)}")
        return list(a)
    out = [None if x is None else _np(x) for x in arr]
    for v, a in enumerate(out):
        if a is not None and a.shape != shape:
            raise ValueError(f"write_scene: {key}[{v}]: expected {list(shape)}, got {list(a.shape)}")
    return out


def write_video(path: str | Path, frames: np.ndarray | Tensor, fps: float) -> None:
    """Write ``frames [T, H, W, 3]`` (uint8 or float in [0, 1]) as an H.264 mp4, atomically."""
    frames = _as_uint8(frames)
    with (
        atomic_path(path) as tmp,
        iio.get_writer(
            tmp,
            format="FFMPEG",
            fps=fps,
            codec="libx264",
            quality=9,
            macro_block_size=1,
            ffmpeg_log_level="error",
        ) as writer,
    ):
        for f in frames:
            writer.append_data(f)


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _as_uint8(x: Tensor | np.ndarray) -> np.ndarray:
    a = _np(x)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return a
