"""COLMAP sparse models: ``cameras`` and ``images`` in the binary (``.bin``) or text (``.txt``) layout.

Parsed with ``struct`` from the layout COLMAP documents (doc/format.rst, "Output format"; written
by ``src/colmap/scene/reconstruction_io.cc``), so pycolmap is not needed. Binary files are
little-endian::

    cameras.bin  uint64 n; n x (uint32 camera_id, int32 model_id, uint64 width, uint64 height,
                                double params[num_params(model)])
    images.bin   uint64 n; n x (uint32 image_id, double qw qx qy qz, double tx ty tz,
                                uint32 camera_id, char name[] (NUL-terminated),
                                uint64 num_points2D, num_points2D x (double x, double y, int64 point3D_id))

    points3D.bin uint64 n; n x (uint64 point3D_id, double xyz[3], uint8 rgb[3], double error,
                                uint64 track_length, track_length x (uint32 image_id, uint32 point2D_idx))

``q``/``t`` are world-to-camera (``x_cam = R(q) x_world + t``) in OpenCV axes, and pixel
coordinates have their origin at the top-left corner of the image: fourdgen's own conventions.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fourdgen.data.scene import SceneFormatError

# model id -> (name, number of params); COLMAP's src/colmap/sensor/models.h.
CAMERA_MODELS = {
    0: ("SIMPLE_PINHOLE", 3),
    1: ("PINHOLE", 4),
    2: ("SIMPLE_RADIAL", 4),
    3: ("RADIAL", 5),
    4: ("OPENCV", 8),
    5: ("OPENCV_FISHEYE", 8),
    6: ("FULL_OPENCV", 12),
    7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4),
    9: ("RADIAL_FISHEYE", 5),
    10: ("THIN_PRISM_FISHEYE", 12),
}
MODEL_IDS = {name: (i, n) for i, (name, n) in CAMERA_MODELS.items()}


@dataclass
class Camera:
    """One COLMAP camera: model name, image size and its parameter vector."""

    id: int
    model: str
    width: int
    height: int
    params: np.ndarray  # [num_params] float64


@dataclass
class Image:
    """One registered image: world-to-camera quaternion ``qvec`` (w, x, y, z) and ``tvec``."""

    id: int
    qvec: np.ndarray  # [4]
    tvec: np.ndarray  # [3]
    camera_id: int
    name: str


class _Reader:
    """Sequential little-endian reads that name the file and the record on a short read."""

    def __init__(self, path: Path):
        self.path, self.buf, self.pos = path, path.read_bytes(), 0

    def read(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise SceneFormatError(self.path, what, f"{size} more bytes", f"end of file at byte {self.pos}")
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return out

    def string(self, what: str) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise SceneFormatError(self.path, what, "a NUL-terminated name", "end of file")
        s = self.buf[self.pos : end].decode("utf-8")
        self.pos = end + 1
        return s


def read_cameras_bin(path: Path) -> dict[int, Camera]:
    r = _Reader(path)
    (n,) = r.read("Q", "num_cameras")
    cams = {}
    for i in range(n):
        cid, model_id, w, h = r.read("IiQQ", f"cameras[{i}]")
        if model_id not in CAMERA_MODELS:
            raise SceneFormatError(
                path, f"cameras[{i}].model_id", f"one of {sorted(CAMERA_MODELS)}", model_id
            )
        name, k = CAMERA_MODELS[model_id]
        cams[cid] = Camera(cid, name, w, h, np.array(r.read(f"{k}d", f"cameras[{i}].params")))
    return cams


def read_images_bin(path: Path) -> dict[int, Image]:
    r = _Reader(path)
    (n,) = r.read("Q", "num_reg_images")
    images = {}
    for i in range(n):
        iid, *qt, cid = r.read("I7dI", f"images[{i}]")
        name = r.string(f"images[{i}].name")
        (npts,) = r.read("Q", f"images[{i}].num_points2D")
        r.read(f"{24 * npts}x", f"images[{i}].points2D")  # skipped: 2 doubles + an int64 each
        images[iid] = Image(iid, np.array(qt[:4]), np.array(qt[4:]), cid, name)
    return images


@dataclass
class Points:
    """The sparse cloud: ``xyz [N, 3]`` and, per point, the ids of the images that observed it."""

    xyz: np.ndarray
    tracks: list[set[int]]


def read_points3d_bin(path: Path) -> Points:
    r = _Reader(path)
    (n,) = r.read("Q", "num_points")
    xyz, tracks = np.zeros((n, 3)), []
    for i in range(n):
        _, *p = r.read("Q3d3Bd", f"points[{i}]")
        xyz[i] = p[:3]
        (k,) = r.read("Q", f"points[{i}].track_length")
        track = r.read(f"{2 * k}I", f"points[{i}].track")
        tracks.append(set(track[0::2]))
    return Points(xyz, tracks)


def read_points3d_txt(path: Path) -> Points:
    xyz, tracks = [], []
    for no, f in _lines(path):
        if not f:
            continue
        try:
            xyz.append([float(x) for x in f[1:4]])
            tracks.append({int(x) for x in f[8::2]})
        except (ValueError, IndexError) as e:
            raise SceneFormatError(
                path, f"line {no}", "POINT3D_ID X Y Z R G B ERROR TRACK[]", " ".join(f)
            ) from e
    return Points(np.array(xyz, dtype=np.float64).reshape(-1, 3), tracks)


def read_points3d(folder: Path) -> Points | None:
    """The model's points3D (binary preferred), or None if it has none."""
    if (folder / "points3D.bin").is_file():
        return read_points3d_bin(folder / "points3D.bin")
    if (folder / "points3D.txt").is_file():
        return read_points3d_txt(folder / "points3D.txt")
    return None


def _lines(path: Path):
    """(line number, fields) of the non-comment lines of a COLMAP text file, blank lines included."""
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.startswith("#"):
            yield no, line.split()


def read_cameras_txt(path: Path) -> dict[int, Camera]:
    cams = {}
    for no, f in _lines(path):
        if not f:
            continue
        try:
            cid, model, w, h, params = int(f[0]), f[1], int(f[2]), int(f[3]), [float(x) for x in f[4:]]
        except (ValueError, IndexError) as e:
            raise SceneFormatError(
                path, f"line {no}", "CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]", " ".join(f)
            ) from e
        if model not in MODEL_IDS or len(params) != MODEL_IDS[model][1]:
            want = f"a COLMAP model ({', '.join(MODEL_IDS)}) with its number of params"
            raise SceneFormatError(path, f"line {no}.MODEL", want, f"{model} with {len(params)} params")
        cams[cid] = Camera(cid, model, w, h, np.array(params))
    return cams


def read_images_txt(path: Path) -> dict[int, Image]:
    images = {}
    lines = list(_lines(path))
    # Two lines per image; the points line may be empty. Skip leading blank lines only.
    k = 0
    while k < len(lines):
        no, f = lines[k]
        if not f:
            k += 1
            continue
        try:
            iid, q, t, cid, name = (
                int(f[0]),
                [float(x) for x in f[1:5]],
                [float(x) for x in f[5:8]],
                int(f[8]),
                f[9],
            )
        except (ValueError, IndexError) as e:
            raise SceneFormatError(
                path, f"line {no}", "IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME", " ".join(f)
            ) from e
        images[iid] = Image(iid, np.array(q), np.array(t), cid, " ".join(f[9:]) or name)
        k += 2  # the POINTS2D line
    return images


def find_model(src: Path) -> Path:
    """The folder holding ``cameras``/``images``: ``src``, ``src/sparse/0`` or ``src/sparse``."""
    for d in (src, src / "sparse" / "0", src / "sparse"):
        if any((d / f"cameras.{ext}").is_file() for ext in ("bin", "txt")):
            return d
    raise SceneFormatError(
        src, "<folder>", "a COLMAP model (cameras.bin/.txt in it, sparse/0 or sparse)", "none found"
    )


def read_model(folder: Path) -> tuple[dict[int, Camera], dict[int, Image]]:
    """Cameras and images of a model folder, binary files preferred."""
    if (folder / "cameras.bin").is_file():
        if not (folder / "images.bin").is_file():
            raise SceneFormatError(
                folder / "images.bin", "<file>", "images.bin beside cameras.bin", "missing file"
            )
        return read_cameras_bin(folder / "cameras.bin"), read_images_bin(folder / "images.bin")
    if not (folder / "images.txt").is_file():
        raise SceneFormatError(
            folder / "images.txt", "<file>", "images.txt beside cameras.txt", "missing file"
        )
    return read_cameras_txt(folder / "cameras.txt"), read_images_txt(folder / "images.txt")
