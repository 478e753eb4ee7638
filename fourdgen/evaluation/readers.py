"""Readers of the benchmarks' ground-truth files, each in its documented layout.

- MPI Sintel (``sintel_io.py`` of the depth/camera release): ``.dpt`` is ``float32 TAG = 202021.25,
  int32 width, int32 height, float32 depth[height * width]``; ``.cam`` is ``float32 TAG,
  float64 M[3 x 3] (intrinsics), float64 N[3 x 4] (world-to-camera [R | t])``, row-major, little-endian.
- TUM RGB-D / Bonn RGB-D Dynamic: ``groundtruth.txt`` lines ``timestamp tx ty tz qx qy qz qw`` (the
  colour camera's optical centre and orientation in the world: camera-to-world, OpenCV axes),
  ``rgb.txt`` / ``depth.txt`` lines ``timestamp filename``, ``#`` comments; depth PNGs are 16-bit,
  ``depth_m = value / 5000``, 0 = no measurement.
"""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as iio
import numpy as np
import torch

from fourdgen.data.scene import SceneFormatError
from fourdgen.geometry.cameras import invert_rigid, make_rigid
from fourdgen.geometry.rotations import quaternion_to_matrix

SINTEL_TAG = 202021.25
TUM_DEPTH_FACTOR = 5000.0


def _check_tag(path: Path, buf: bytes) -> None:
    if len(buf) < 4 or np.frombuffer(buf[:4], "<f4")[0] != np.float32(SINTEL_TAG):
        raise SceneFormatError(
            path, "<tag>", f"Sintel's tag {SINTEL_TAG} in the first 4 bytes", "another value"
        )


def read_sintel_depth(path: str | Path) -> np.ndarray:
    """Depth ``[H, W]`` float32 of a Sintel ``.dpt`` file."""
    path = Path(path)
    buf = path.read_bytes()
    _check_tag(path, buf)
    if len(buf) < 12:
        raise SceneFormatError(path, "width/height", "two int32 after the tag", "end of file")
    w, h = (int(x) for x in np.frombuffer(buf[4:12], "<i4"))
    if w <= 0 or h <= 0 or w * h > 1e8 or len(buf) != 12 + 4 * w * h:
        raise SceneFormatError(
            path, "width/height", f"{w} x {h} float32 values after the header", f"{len(buf) - 12} bytes"
        )
    return np.frombuffer(buf[12:], "<f4").reshape(h, w).copy()


def read_sintel_cam(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(K [3, 3], w2c [4, 4])`` float64 of a Sintel ``.cam`` file."""
    path = Path(path)
    buf = path.read_bytes()
    _check_tag(path, buf)
    if len(buf) != 4 + 8 * 21:
        raise SceneFormatError(
            path, "M/N", "3x3 intrinsics and 3x4 extrinsics in float64 (172 bytes)", f"{len(buf)} bytes"
        )
    vals = np.frombuffer(buf[4:], "<f8")
    w2c = np.eye(4)
    w2c[:3] = vals[9:].reshape(3, 4)
    return vals[:9].reshape(3, 3).copy(), w2c


def _rows(path: Path, width: int, what: str) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise SceneFormatError(path, "<file>", f"an existing {path.name}", "missing file")
    out = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        f = line.replace(",", " ").split()
        if not f or f[0].startswith("#"):
            continue
        if len(f) < width:
            raise SceneFormatError(path, f"line {no}", what, line.strip())
        out.append((no, f))
    return out


def read_tum_trajectory(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(timestamps [N], w2c [N, 4, 4])`` of a TUM ``groundtruth.txt`` (or a TUM-format prediction)."""
    path = Path(path)
    what = "timestamp tx ty tz qx qy qz qw"
    rows = _rows(path, 8, what)
    try:
        vals = np.array([[float(x) for x in f[:8]] for _, f in rows], dtype=np.float64).reshape(-1, 8)
    except ValueError as e:
        raise SceneFormatError(path, "<line>", what, str(e)) from e
    if not np.isfinite(vals).all() or (np.linalg.norm(vals[:, 4:], axis=1) < 1e-6).any():
        raise SceneFormatError(path, "qx qy qz qw", "finite values and non-zero quaternions")
    q = torch.as_tensor(vals[:, [7, 4, 5, 6]])  # xyzw -> wxyz
    c2w = make_rigid(quaternion_to_matrix(q), torch.as_tensor(vals[:, 1:4]))
    return vals[:, 0], invert_rigid(c2w).numpy()


def read_file_list(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """``(timestamps [N], relative file names)`` of a TUM ``rgb.txt`` / ``depth.txt``."""
    path = Path(path)
    rows = _rows(path, 2, "timestamp filename")
    try:
        return np.array([float(f[0]) for _, f in rows]), [f[1] for _, f in rows]
    except ValueError as e:
        raise SceneFormatError(path, "<line>", "timestamp filename", str(e)) from e


def associate(t_query: np.ndarray, t_ref: np.ndarray, max_diff: float = 0.02) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of timestamps closest first, at most ``max_diff`` s apart (TUM's
    ``associate.py``); returns ``(query index, ref index)`` pairs sorted by query."""
    d = np.abs(t_query[:, None] - t_ref[None, :])
    cand = sorted(zip(*np.nonzero(d <= max_diff), strict=True), key=lambda ij: d[ij])
    used_q, used_r, out = set(), set(), []
    for i, j in cand:
        if i not in used_q and j not in used_r:
            used_q.add(i)
            used_r.add(j)
            out.append((int(i), int(j)))
    return sorted(out)


def read_depth_png(path: str | Path, factor: float = TUM_DEPTH_FACTOR) -> np.ndarray:
    """Metric depth ``[H, W]`` float32 of a 16-bit TUM/Bonn depth PNG (0 = no measurement)."""
    path = Path(path)
    d = iio.imread(path)
    if d.dtype != np.uint16 or d.ndim != 2:
        raise SceneFormatError(path, "<pixels>", "a single-channel 16-bit PNG", f"{d.dtype} {list(d.shape)}")
    return d.astype(np.float32) / factor
