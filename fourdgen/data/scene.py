"""On-disk scene format: ``scene.json`` + frames (+ optional depth, xyz pointmaps, masks).

A scene is a grid of V views x T timesteps, the layout every stage reads. ``scene.json``::

    {
      "format": "fourdgen-scene", "version": 1,
      "width": 64, "height": 48, "num_frames": 8, "fps": 8.0, "caption": "a red ball bouncing",
      "views": [
        {"name": "cam00",
         "K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]],   # pixels, corner-origin (geometry/cameras.py)
         "w2c": [[4x4], ... T of them],                 # OpenCV world-to-camera; one 4x4 = static
         "rgb": ["rgb/cam00/0000.png", ...]  or  "rgb/cam00.mp4",
         "depth": "depth/cam00.npy",                    # optional, float32 [T, H, W] z-depth, 0 = none
         "xyz": "xyz/cam00.npy",                        # optional, float32 [T, H, W, 3] world points
         "mask": "mask/cam00.npy"}                      # optional, uint8 [T, H, W] object ids, 0 = bg
      ],
      "source_view": 0                                  # optional, see below
    }

``source_view`` (optional, an int in ``[0, V)``): the row that is the input video of a generated grid;
its depth is the one the projection conditioning used (Full-4D grids: that view alone has a depth
file). Any other top-level key is kept as :attr:`Scene.extra`.

Paths are relative to the scene folder. :func:`read_scene` validates everything it can without
decoding frames (files exist, image headers and array shapes match, cameras are finite and rigid)
and raises one :class:`SceneFormatError` naming file, field and what was expected.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imageio.v2 as iio
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fourdgen.errors import FileFormatError
from fourdgen.geometry.cameras import is_rigid

FORMAT_NAME = "fourdgen-scene"
FORMAT_VERSION = 1
SCENE_FILE = "scene.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4",)


class SceneFormatError(FileFormatError):
    """A scene on disk does not follow the format. Names the file, the field and the expectation."""


@dataclass
class ViewFiles:
    """Files of one view. ``rgb`` is a list of T image paths or one video path."""

    name: str
    rgb: list[Path] | Path
    depth: Path | None = None
    xyz: Path | None = None
    mask: Path | None = None


@dataclass
class Scene:
    """A validated scene. Frames are loaded on demand.

    Attributes: ``K [V, 3, 3]``, ``w2c [V, T, 4, 4]`` (float32, OpenCV), ``views`` (files per view),
    ``source_view`` (the input video's row of a generated grid, or None), ``extra`` (other keys).
    """

    root: Path
    width: int
    height: int
    num_frames: int
    fps: float
    caption: str
    K: Tensor
    w2c: Tensor
    views: list[ViewFiles]
    extra: dict[str, Any] = field(default_factory=dict)
    source_view: int | None = None

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def has_depth(self) -> bool:
        return all(v.depth is not None for v in self.views)

    @property
    def has_xyz(self) -> bool:
        return all(v.xyz is not None for v in self.views)

    @property
    def has_mask(self) -> bool:
        return all(v.mask is not None for v in self.views)

    def load_rgb(self, view: int, times: list[int] | None = None) -> Tensor:
        """RGB frames ``[T', 3, H, W]`` float32 in [0, 1] of one view (all times by default)."""
        times = list(range(self.num_frames)) if times is None else list(times)
        src = self.views[view].rgb
        file = self.root / SCENE_FILE
        if isinstance(src, Path):  # one video per view
            fld = f"views[{view}].rgb"
            try:
                with iio.get_reader(src, format="FFMPEG") as reader:
                    frames = [reader.get_data(t) for t in times]
            except (OSError, RuntimeError, ValueError, IndexError) as e:
                raise SceneFormatError(file, fld, f"a readable .mp4 video ({src.name})", _short(e)) from e
        else:
            frames = [_decode(src[t], file, f"views[{view}].rgb[{t}]") for t in times]
        for t, f in zip(times, frames, strict=True):
            if f.shape[:2] != (self.height, self.width) or f.dtype != np.uint8:
                got = f"{f.shape[1]}x{f.shape[0]} {f.dtype}" if f.ndim >= 2 else f"shape {f.shape}"
                raise SceneFormatError(
                    file, f"views[{view}].rgb[{t}]", f"a {self.width}x{self.height} 8-bit frame", got
                )
        arr = np.stack([_to_rgb(f) for f in frames])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0

    def _load_array(self, view: int, name: str, times: list[int] | None) -> Tensor | None:
        path = getattr(self.views[view], name)
        if path is None:
            return None
        fld = f"views[{view}].{name}"
        try:
            arr = np.load(path, mmap_mode="r")
            arr = np.array(arr if times is None else arr[list(times)])  # copy: the map is read-only
        except (OSError, ValueError, IndexError) as e:
            raise SceneFormatError(
                self.root / SCENE_FILE, fld, f"a readable .npy array ({path.name})", _short(e)
            ) from e
        if arr.dtype.kind not in _ARRAY_KINDS[name][0]:
            raise SceneFormatError(self.root / SCENE_FILE, fld, _ARRAY_KINDS[name][1], f"dtype {arr.dtype}")
        return torch.from_numpy(arr)

    def _finite(self, x: Tensor | None, view: int, name: str) -> Tensor | None:
        """Checked on load, not by ``read_scene``: that would read every array of a dataset."""
        if x is not None and not torch.isfinite(x).all():
            raise SceneFormatError(
                self.root / SCENE_FILE, f"views[{view}].{name}", "finite values", "NaN or inf"
            )
        return x

    def load_depth(self, view: int, times: list[int] | None = None) -> Tensor | None:
        """Z-depth ``[T', H, W]`` float32 (0 where unknown), or None if the scene has none."""
        d = self._load_array(view, "depth", times)
        return self._finite(None if d is None else d.float(), view, "depth")

    def load_xyz(self, view: int, times: list[int] | None = None) -> Tensor | None:
        """World-space pointmaps ``[T', H, W, 3]`` float32, or None."""
        x = self._load_array(view, "xyz", times)
        return self._finite(None if x is None else x.float(), view, "xyz")

    def load_mask(self, view: int, times: list[int] | None = None) -> Tensor | None:
        """Object-id masks ``[T', H, W]`` uint8 (0 = background), or None."""
        return self._load_array(view, "mask", times)


def _decode(path: Path, file: Path, fld: str) -> np.ndarray:
    """One image frame's pixels; a file that does not decode (truncated, not an image) is the
    scene's error, named by its field."""
    try:
        return np.asarray(iio.imread(path))
    except (OSError, SyntaxError, ValueError, RuntimeError) as e:
        raise SceneFormatError(file, fld, f"a PNG or JPEG image ({path.name})", _short(e)) from e


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=-1)
    return np.ascontiguousarray(frame[..., :3]).astype(np.uint8)


def _require(obj: dict, key: str, file: Path, expected: str, prefix: str = "") -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise SceneFormatError(file, prefix + key, expected, "missing")
    return obj[key]


def _positive_int(obj: dict, key: str, file: Path) -> int:
    v = _require(obj, key, file, "a positive integer")
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise SceneFormatError(file, key, "a positive integer", repr(v))
    return v


def _matrix(value: Any, file: Path, fld: str, *shapes: tuple[int, ...]) -> Tensor:
    """Parse a numeric array whose shape is one of ``shapes``; finite values only."""
    expected = " or ".join(str(list(s)) for s in shapes)
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SceneFormatError(file, fld, f"a numeric array of shape {expected}", repr(value)[:80]) from e
    if tuple(t.shape) not in shapes:
        raise SceneFormatError(file, fld, f"shape {expected}", list(t.shape))
    if not torch.isfinite(t).all():
        raise SceneFormatError(file, fld, "finite numbers", "NaN or inf")
    return t


def _file(root: Path, rel: Any, file: Path, fld: str, suffixes: tuple[str, ...]) -> Path:
    if not isinstance(rel, str):
        raise SceneFormatError(file, fld, f"a relative path ending in {'/'.join(suffixes)}", repr(rel))
    p = root / rel
    if p.suffix.lower() not in suffixes:
        raise SceneFormatError(file, fld, f"a file ending in {'/'.join(suffixes)}", rel)
    if not p.is_file():
        raise SceneFormatError(file, fld, f"an existing file ({p})", "missing file")
    return p


# What each array holds: numpy dtype kinds accepted, and the words for the error.
_ARRAY_KINDS = {
    "depth": ("f", "a float array (z-depth, 0 = unknown)"),
    "xyz": ("f", "a float array (world points)"),
    "mask": ("uib", "an integer or bool array (object ids, 0 = background)"),
}


# What np.load raises on a file that is not a .npy array (an empty file: EOFError; a pickle: ValueError).
_NPY_ERRORS = (OSError, ValueError, EOFError, pickle.UnpicklingError)


def _short(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:120] or type(e).__name__


def _open_image(p: Path, file: Path, fld: str):
    """``PIL.Image.open`` of a frame, its failures as a SceneFormatError naming the field."""
    try:
        return Image.open(p)
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise SceneFormatError(file, fld, f"a PNG or JPEG image ({p.name})", _short(e)) from e


def _check_array(path: Path, file: Path, fld: str, shape: tuple[int, ...]) -> None:
    try:
        arr = np.load(path, mmap_mode="r")
    except _NPY_ERRORS as e:
        raise SceneFormatError(file, fld, "a .npy array", f"unreadable ({_short(e)})") from e
    if tuple(arr.shape) != shape:
        raise SceneFormatError(file, fld, f"array of shape {list(shape)} in {path.name}", list(arr.shape))
    kinds = _ARRAY_KINDS[fld.rsplit(".", 1)[-1]]
    if arr.dtype.kind not in kinds[0]:
        raise SceneFormatError(file, fld, f"{kinds[1]} in {path.name}", f"dtype {arr.dtype}")


@dataclass(frozen=True)
class _Header:
    """The scene-wide fields of ``scene.json``, validated."""

    width: int
    height: int
    num_frames: int
    fps: float | int
    caption: str
    views: list


def _load_json(file: Path) -> dict:
    """``scene.json`` as a dict: the file exists and holds one JSON object."""
    if not file.is_file():
        raise SceneFormatError(file, "<file>", "an existing scene.json", "missing file")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise SceneFormatError(
            file, "<json>", "valid JSON", f"{e.msg} at line {e.lineno} col {e.colno}"
        ) from e
    if not isinstance(meta, dict):
        raise SceneFormatError(file, "<root>", "a JSON object", type(meta).__name__)
    return meta


def _check_header(meta: dict, file: Path) -> _Header:
    """Format name and version, sizes, fps, caption and a non-empty ``views`` list."""
    if meta.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise SceneFormatError(file, "format", f"'{FORMAT_NAME}'", repr(meta.get("format")))
    if meta.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise SceneFormatError(file, "version", str(FORMAT_VERSION), repr(meta.get("version")))
    W, H, T = (_positive_int(meta, k, file) for k in ("width", "height", "num_frames"))
    fps = meta.get("fps", 8.0)
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
        raise SceneFormatError(file, "fps", "a positive number", repr(fps))
    caption = meta.get("caption", "")
    if not isinstance(caption, str):
        raise SceneFormatError(file, "caption", "a string", type(caption).__name__)
    views = _require(meta, "views", file, "a non-empty list of views")
    if not isinstance(views, list) or not views:
        raise SceneFormatError(file, "views", "a non-empty list of views", repr(views)[:80])
    return _Header(width=W, height=H, num_frames=T, fps=fps, caption=caption, views=views)


def _check_cameras(vm: dict, file: Path, pre: str, T: int) -> tuple[Tensor, Tensor]:
    """A view's ``K [3, 3]`` (pinhole) and ``w2c [T, 4, 4]`` (rigid; one 4x4 is repeated), float64."""
    K = _matrix(_require(vm, "K", file, "a 3x3 matrix", pre), file, pre + "K", (3, 3))
    if K[0, 0] <= 0 or K[1, 1] <= 0 or K[2].tolist() != [0.0, 0.0, 1.0] or K[1, 0] != 0:
        raise SceneFormatError(
            file, pre + "K", "a pinhole matrix (fx, fy > 0, last row [0, 0, 1])", K.tolist()
        )
    raw = _require(vm, "w2c", file, f"{T} 4x4 matrices (or one)", pre)
    w2c = _matrix(raw, file, pre + "w2c", (T, 4, 4), (4, 4))
    w2c = w2c.expand(T, 4, 4) if w2c.ndim == 2 else w2c
    bad = (~is_rigid(w2c)).nonzero()
    if len(bad):
        raise SceneFormatError(
            file,
            f"{pre}w2c[{int(bad[0])}]",
            "a rigid transform (orthonormal R, det 1, last row [0, 0, 0, 1])",
            w2c[int(bad[0])].tolist(),
        )
    return K, w2c


def _check_rgb(
    vm: dict, root: Path, file: Path, pre: str, h: _Header, check_files: bool
) -> list[Path] | Path:
    """A view's frames: ``T`` image paths or one video, of the scene's size (``check_files``)."""
    W, H, T = h.width, h.height, h.num_frames
    rgb_meta = _require(vm, "rgb", file, f"a list of {T} image paths or one .mp4 path", pre)
    if isinstance(rgb_meta, list):
        if len(rgb_meta) != T:
            raise SceneFormatError(file, pre + "rgb", f"{T} frames (num_frames)", f"{len(rgb_meta)} frames")
        rgb = [_file(root, r, file, f"{pre}rgb[{t}]", IMAGE_SUFFIXES) for t, r in enumerate(rgb_meta)]
        if check_files:
            for t, p in enumerate(rgb):
                with _open_image(p, file, f"{pre}rgb[{t}]") as im:
                    if im.size != (W, H):
                        raise SceneFormatError(
                            file,
                            f"{pre}rgb[{t}]",
                            f"a {W}x{H} image ({p.name})",
                            f"{im.size[0]}x{im.size[1]}",
                        )
        return rgb
    rgb = _file(root, rgb_meta, file, pre + "rgb", VIDEO_SUFFIXES)
    if check_files:
        try:
            with iio.get_reader(rgb, format="FFMPEG") as reader:
                n_frames = reader.count_frames()
                size = tuple(reader.get_meta_data().get("size", (W, H)))
        except (OSError, RuntimeError, ValueError, IndexError) as e:  # imageio-ffmpeg's errors
            raise SceneFormatError(file, pre + "rgb", f"a readable .mp4 video ({rgb.name})", _short(e)) from e
        if n_frames != T:
            raise SceneFormatError(file, pre + "rgb", f"a video of {T} frames", f"{n_frames} frames")
        if size != (W, H):
            raise SceneFormatError(file, pre + "rgb", f"a {W}x{H} video", f"{size[0]}x{size[1]}")
    return rgb


def _check_arrays(vm: dict, root: Path, file: Path, pre: str, h: _Header, check_files: bool) -> dict:
    """A view's optional ``depth``/``xyz``/``mask`` ``.npy`` files (shapes checked if ``check_files``)."""
    T, H, W = h.num_frames, h.height, h.width
    extras = {}
    for key, shape in (("depth", (T, H, W)), ("xyz", (T, H, W, 3)), ("mask", (T, H, W))):
        if vm.get(key) is None:
            extras[key] = None
            continue
        p = _file(root, vm[key], file, pre + key, (".npy",))
        if check_files:
            _check_array(p, file, pre + key, shape)
        extras[key] = p
    return extras


def _check_source_view(meta: dict, file: Path, V: int) -> int | None:
    """The optional ``source_view``: an int view index in ``[0, V)``."""
    s = meta.get("source_view")
    if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < V):
        raise SceneFormatError(file, "source_view", f"an integer view index in [0, {V}) or null", repr(s))
    return s


def read_scene(path: str | Path, check_files: bool = True) -> Scene:
    """Read and validate a scene folder (or its ``scene.json``). Raises :class:`SceneFormatError`."""
    path = Path(path)
    root = path.parent if path.name == SCENE_FILE else path
    file = root / SCENE_FILE
    meta = _load_json(file)
    h = _check_header(meta, file)
    source_view = _check_source_view(meta, file, len(h.views))
    Ks, w2cs, views = [], [], []
    for i, vm in enumerate(h.views):
        pre = f"views[{i}]."
        if not isinstance(vm, dict):
            raise SceneFormatError(file, f"views[{i}]", "an object", type(vm).__name__)
        K, w2c = _check_cameras(vm, file, pre, h.num_frames)
        name = vm.get("name", f"view{i:02d}")
        if not isinstance(name, str):
            raise SceneFormatError(file, pre + "name", "a string", repr(name)[:80])
        rgb = _check_rgb(vm, root, file, pre, h, check_files)
        extras = _check_arrays(vm, root, file, pre, h, check_files)
        Ks.append(K)
        w2cs.append(w2c)
        views.append(ViewFiles(name=name, rgb=rgb, **extras))

    known = {"format", "version", "width", "height", "num_frames", "fps", "caption", "views", "source_view"}
    return Scene(
        root=root,
        width=h.width,
        height=h.height,
        num_frames=h.num_frames,
        fps=float(h.fps),
        caption=h.caption,
        K=torch.stack(Ks).float(),
        w2c=torch.stack(w2cs).float(),
        views=views,
        extra={k: v for k, v in meta.items() if k not in known},
        source_view=source_view,
    )


def find_scenes(root: str | Path) -> list[Path]:
    """Scene folders under ``root`` (``root`` itself if it holds a scene.json), sorted."""
    root = Path(root)
    if (root / SCENE_FILE).is_file():
        return [root]
    return sorted(p.parent for p in root.glob(f"*/{SCENE_FILE}"))
