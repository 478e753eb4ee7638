"""What every importer shares: checked field access with file-and-field errors, image loading and
downscaling, OpenGL -> OpenCV camera conversion, and writing the result as a scene.

Importers read a dataset's own layout and hand :func:`write_imported` frames ``[V, T, H, W, 3]``
uint8, ``K [V, 3, 3]`` (pixels, corner origin) and OpenCV ``w2c [V, T, 4, 4]``; it writes them
with :func:`fourdgen.data.scene_writer.write_scene` and validates them with ``read_scene``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import imageio.v2 as iio
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fourdgen.data.scene import SceneFormatError, read_scene
from fourdgen.data.scene_writer import write_scene
from fourdgen.geometry.cameras import invert_rigid, is_rigid, opengl_to_opencv, scale_intrinsics
from fourdgen.io import claim_output_dir, write_manifest

WRITER = "import"


def load_json(file: Path) -> Any:
    """A JSON file's content, or :class:`SceneFormatError` naming the file."""
    if not file.is_file():
        raise SceneFormatError(file, "<file>", "an existing file", "missing file")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise SceneFormatError(file, "<json>", "valid JSON", f"{e.msg} at line {e.lineno}") from e


def field(obj: Any, key: str, file: Path, expected: str, prefix: str = "") -> Any:
    """``obj[key]``; missing (or ``obj`` not an object) raises naming ``prefix + key``."""
    if not isinstance(obj, dict) or key not in obj:
        raise SceneFormatError(file, prefix + key, expected, "missing")
    return obj[key]


def number(value: Any, file: Path, name: str, positive: bool = False) -> float:
    """A finite real number (``positive``: > 0)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or (positive and value <= 0):
        raise SceneFormatError(file, name, "a positive number" if positive else "a number", repr(value))
    return float(value)


def array(value: Any, file: Path, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A finite float64 array of ``shape`` from nested lists."""
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise SceneFormatError(file, name, f"a numeric array of shape {list(shape)}", repr(value)[:60]) from e
    if a.shape != shape:
        raise SceneFormatError(file, name, f"shape {list(shape)}", list(a.shape))
    if not np.isfinite(a).all():
        raise SceneFormatError(file, name, "finite numbers", "NaN or inf")
    return a


def rigid_w2c(w2c: np.ndarray | Tensor, file: Path, name: str) -> Tensor:
    """Check ``w2c [N, 4, 4]`` is rigid (a scaled or sheared pose is a malformed file)."""
    w2c = torch.as_tensor(np.asarray(w2c), dtype=torch.float64)
    bad = (~is_rigid(w2c.reshape(-1, 4, 4), atol=1e-3)).nonzero()
    if len(bad):
        where = name if len(w2c.reshape(-1, 4, 4)) == 1 else f"{name}[{int(bad[0])}]"
        raise SceneFormatError(file, where, "a rigid pose (rotation + translation)")
    return w2c


def opengl_c2w_to_w2c(c2w: np.ndarray | Tensor) -> Tensor:
    """OpenGL/Blender camera-to-world ``[..., 4, 4]`` (x right, y up, z back) -> OpenCV ``w2c``."""
    return invert_rigid(opengl_to_opencv(torch.as_tensor(np.asarray(c2w), dtype=torch.float64)))


def read_image(path: Path, file: Path, name: str, background: float = 0.0) -> np.ndarray:
    """An image file as RGB uint8 ``[H, W, 3]``: grey is repeated, alpha is composited over a grey
    level ``background`` in [0, 1] (D-NeRF / Blender renders are usually scored on white, 1.0)."""
    if not path.is_file():
        raise SceneFormatError(file, name, f"an existing image ({path})", "missing file")
    img = iio.imread(path)
    if img.dtype == np.uint16:
        img = (img / 257.0 + 0.5).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.shape[-1] == 4:
        a = img[..., 3:].astype(np.float32) / 255.0
        img = (img[..., :3] * a + 255.0 * background * (1 - a) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def downscale(frames: np.ndarray, K: Tensor, factor: int) -> tuple[np.ndarray, Tensor]:
    """Shrink ``frames [..., H, W, 3]`` by an integer ``factor`` (area filter) and ``K [..., 3, 3]``
    with them; exact under the corner-origin convention when ``factor`` divides H and W."""
    if factor == 1:
        return frames, K
    H, W = frames.shape[-3:-1]
    h, w = H // factor, W // factor
    flat = frames.reshape(-1, H, W, 3)
    small = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BOX)) for f in flat])
    return small.reshape(*frames.shape[:-3], h, w, 3), scale_intrinsics(K, w / W, h / H)


def write_imported(
    dst: str | Path,
    rgb: np.ndarray,
    K: Tensor,
    w2c: Tensor,
    *,
    source: str,
    fmt: str,
    fps: float = 30.0,
    view_names: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    frame_format: str = "png",
    overwrite: bool = False,
    **arrays: Any,
) -> Path:
    """Write one imported scene (refusing a folder that holds other files) and read it back.

    ``rgb [V, T, H, W, 3]`` uint8, ``K [V, 3, 3]``, ``w2c [V, T, 4, 4]`` OpenCV; ``arrays``: the
    optional ``depth``/``mask`` of :func:`~fourdgen.data.scene_writer.write_scene`. ``extra`` holds
    what the scene format has no field for (dataset ids, times, splits), kept as top-level keys.
    """
    dst = Path(dst)
    claim_output_dir(dst, WRITER, overwrite=overwrite, what=f"import {fmt}")
    meta = {"imported_from": {"format": fmt, "source": str(source)}, **(extra or {})}
    write_scene(
        dst,
        rgb,
        K.double(),
        w2c.double(),
        fps=fps,
        frame_format=frame_format,
        view_names=view_names,
        extra=meta,
        **arrays,
    )
    write_manifest(dst, WRITER, format=fmt)
    read_scene(dst)  # what we wrote must be a valid scene
    return dst
