"""Standard 3DGS PLY files (the layout of graphdeco-inria/gaussian-splatting, read by every viewer).

One binary little-endian ``vertex`` element with float32 properties, in this order:
``x y z nx ny nz f_dc_0..2 f_rest_0..(3 (K-1) - 1) opacity scale_0..2 rot_0..3`` where normals are
zeros, ``f_dc`` is the degree-0 SH coefficient, ``f_rest`` the higher bands stored channel-major
(the [N, 3, K-1] transpose of our [N, K-1, 3], flattened), ``opacity`` a logit, ``scale`` log
standard deviations and ``rot`` a (w, x, y, z) quaternion.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement, PlyListProperty

from fourdgen.errors import FileFormatError, short_error
from fourdgen.gaussians.container import Gaussians, sh_degree_from_bases
from fourdgen.io import atomic_path

_REQUIRED = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
_REQUIRED += [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]


def _attribute_names(n_rest: int) -> list[str]:
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(n_rest)]
    return names + ["opacity"] + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]


def gaussians_to_array(g: Gaussians) -> np.ndarray:
    """Structured float32 array ``[N]`` with the 3DGS vertex properties of ``g``."""
    g = g.detach().to("cpu", torch.float32)
    n = g.num
    # channel-major, as the 3DGS code writes it; explicit width so an empty set still works
    f_rest = g.shN.transpose(1, 2).reshape(n, 3 * g.shN.shape[1])
    cols = [g.means, torch.zeros(n, 3), g.sh0[:, 0], f_rest, g.opacity_logits[:, None], g.log_scales, g.quats]
    data = torch.cat(cols, dim=1).numpy()
    names = _attribute_names(f_rest.shape[1])
    arr = np.empty(n, dtype=[(name, "f4") for name in names])
    for i, name in enumerate(names):
        arr[name] = data[:, i]
    return arr


def save_ply(path: str | os.PathLike, gaussians: Gaussians) -> Path:
    """Write ``gaussians`` to ``path`` atomically (temp file in the same directory + os.replace), so a
    reader never sees a half-written file. Creates the parent directory. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    el = PlyElement.describe(gaussians_to_array(gaussians), "vertex")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        PlyData([el], byte_order="<").write(f)
        f.flush()
        os.fsync(f.fileno())
    return path


def load_ply(path: str | os.PathLike, device: str | torch.device = "cpu") -> Gaussians:
    """Read a 3DGS PLY file. Anything missing or malformed (not a PLY, truncated, a vertex count
    that does not match the data, a missing or list-typed property, NaN/inf values) raises one
    :class:`~fourdgen.errors.FileFormatError` naming the file and the property."""
    path = Path(path)

    def bad(field: str, expected: str, got=None) -> FileFormatError:
        return FileFormatError(path, field, expected, got)

    try:
        # Not memory-mapped: a file replaced or truncated while mapped faults (SIGBUS), not raises.
        ply = PlyData.read(str(path), mmap=False)
    except Exception as e:  # plyfile raises assorted errors on truncated/garbled files
        raise bad("<file>", "a readable PLY file", short_error(e)) from None
    if "vertex" not in [el.name for el in ply.elements]:
        raise bad("vertex", "a 'vertex' element", [el.name for el in ply.elements])
    v = ply["vertex"]
    _check_size(path, ply)
    names = [p.name for p in v.properties]
    for name in _REQUIRED:
        if name not in names:
            raise bad(f"vertex.{name}", "a float property (the 3DGS layout)", "missing")
    lists = [p.name for p in v.properties if isinstance(p, PlyListProperty)]
    if lists:
        raise bad(f"vertex.{lists[0]}", "a scalar property", "a list property")
    rest = sorted((n for n in names if re.fullmatch(r"f_rest_\d+", n)), key=lambda n: int(n[7:]))
    if rest != [f"f_rest_{i}" for i in range(len(rest))] or len(rest) % 3:
        raise bad("vertex.f_rest_*", "f_rest_0..f_rest_{3(K-1)-1}", f"{len(rest)} f_rest properties")
    try:
        sh_degree_from_bases(len(rest) // 3 + 1)
    except ValueError:
        raise bad("vertex.f_rest_*", "a whole SH degree (9, 24 or 45 f_rest properties)", len(rest)) from None

    n = v.count

    def cols(keys: list[str]) -> torch.Tensor:
        if not keys:
            return torch.zeros(n, 0)
        out = np.stack([np.asarray(v[k], dtype=np.float32) for k in keys], axis=1)
        finite = np.isfinite(out)
        if not finite.all():
            row, col = np.argwhere(~finite)[0]
            raise bad(f"vertex.{keys[col]}", "finite values", f"{out[row, col]} at vertex {row}")
        return torch.from_numpy(out)

    quats = cols([f"rot_{i}" for i in range(4)])
    zero = (quats.abs().sum(1) == 0).nonzero()
    if len(zero):
        raise bad("vertex.rot_0..3", "a non-zero quaternion (w, x, y, z)", f"0 at vertex {int(zero[0])}")
    g = Gaussians(
        means=cols(["x", "y", "z"]),
        log_scales=cols([f"scale_{i}" for i in range(3)]),
        quats=quats,
        opacity_logits=cols(["opacity"])[:, 0].contiguous(),
        sh0=cols(["f_dc_0", "f_dc_1", "f_dc_2"])[:, None, :],
        shN=cols(rest).reshape(n, 3, len(rest) // 3).transpose(1, 2).contiguous(),
    )
    return g.to(device)


def _check_size(path: Path, ply: PlyData) -> None:
    """Binary data longer than the header's element counts say: a vertex count too small for the
    data (plyfile reads the first rows and ignores the rest). Shorter data fails to read already."""
    if ply.text or any(isinstance(p, PlyListProperty) for el in ply.elements for p in el.properties):
        return
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    end = head.find(b"end_header")
    if end < 0:
        return
    start = end + len(b"end_header") + (2 if head[end + 10 : end + 12] == b"\r\n" else 1)
    expected = start + sum(el.count * el.data.dtype.itemsize for el in ply.elements)
    size = path.stat().st_size
    if size > expected:
        v = ply["vertex"]
        raise FileFormatError(
            path,
            "vertex",
            f"{v.count} vertices (the header's count) and nothing after them",
            f"{size - expected} more bytes",
        )


def save_ply_sequence(
    directory: str | os.PathLike, gaussians: Sequence[Gaussians], prefix: str = "frame"
) -> list[Path]:
    """One PLY per timestep: ``directory/{prefix}_0000.ply``, ... Returns the paths in order."""
    directory = Path(directory)
    return [save_ply(directory / f"{prefix}_{t:04d}.ply", g) for t, g in enumerate(gaussians)]


def load_ply_sequence(directory: str | os.PathLike, prefix: str = "frame") -> list[Gaussians]:
    """Read back what :func:`save_ply_sequence` wrote, ordered by timestep."""
    paths = sorted(Path(directory).glob(f"{prefix}_[0-9]*.ply"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return [load_ply(p) for p in paths]


def save_point_cloud(path: str | os.PathLike, points: torch.Tensor, colors: torch.Tensor) -> Path:
    """Coloured point cloud PLY (``x y z red green blue``, what MeshLab/Open3D/CloudCompare read),
    written atomically. ``points [N, 3]``, ``colors [N, 3]`` in [0, 1]."""
    pts = points.detach().float().cpu().numpy()
    rgb = (colors.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    arr = np.empty(len(pts), dtype=[(k, "f4") for k in "xyz"] + [(k, "u1") for k in ("red", "green", "blue")])
    for i, k in enumerate("xyz"):
        arr[k] = pts[:, i]
    for i, k in enumerate(("red", "green", "blue")):
        arr[k] = rgb[:, i]
    path = Path(path)
    with atomic_path(path) as tmp:
        PlyData([PlyElement.describe(arr, "vertex")]).write(str(tmp))
    return path
