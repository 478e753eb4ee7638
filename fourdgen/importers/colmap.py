"""COLMAP sparse model + image folder -> a static multi-view scene (V registered images, T = 1).

COLMAP's poses are already OpenCV world-to-camera (quaternion w, x, y, z and translation) and its
pixel origin is the image's top-left corner, so the conversion is the quaternion to a rotation
matrix. Views are ordered by image name. Lens distortion is not undone (kept in ``distortion``).

The sparse points (``points3D``), when the model has them, become each view's sparse depth
(``depth/<view>.npy``, 0 = unknown): every point is drawn, nearest first, into the images whose
track holds it, so the fitter starts from COLMAP's structure instead of random points.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fourdgen.data.scene import SceneFormatError
from fourdgen.geometry.cameras import make_intrinsics, make_rigid
from fourdgen.geometry.rotations import quaternion_to_matrix
from fourdgen.importers.colmap_model import Camera, Points, find_model, read_model, read_points3d
from fourdgen.importers.common import downscale, read_image, write_imported

# (fx, fy, cx, cy) indices into each pinhole-like model's params (fy None: one focal length).
_PINHOLE = {
    "SIMPLE_PINHOLE": (0, None, 1, 2),
    "PINHOLE": (0, 1, 2, 3),
    "SIMPLE_RADIAL": (0, None, 1, 2),
    "RADIAL": (0, None, 1, 2),
    "OPENCV": (0, 1, 2, 3),
    "FULL_OPENCV": (0, 1, 2, 3),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", default=None, help="image folder (default: <src>/images)")
    p.add_argument(
        "--model", default=None, help="model folder (default: <src>, <src>/sparse/0 or <src>/sparse)"
    )


def intrinsics(cam: Camera, file: Path) -> tuple[list[float], list[float]]:
    """``([fx, fy, cx, cy], distortion params)`` of a pinhole-like COLMAP camera."""
    if cam.model not in _PINHOLE:
        raise SceneFormatError(
            file, f"camera {cam.id}.model", f"a pinhole-like model ({', '.join(_PINHOLE)})", cam.model
        )
    ix, iy, icx, icy = _PINHOLE[cam.model]
    p = cam.params
    fx = float(p[ix])
    fy = fx if iy is None else float(p[iy])
    used = 3 if iy is None else 4
    return [fx, fy, float(p[icx]), float(p[icy])], [float(x) for x in p[used:]]


def sparse_depth(
    points: Points, image_id: int, K: Tensor, w2c: Tensor, height: int, width: int
) -> np.ndarray:
    """Depth ``[H, W]`` float32 of the points observed by ``image_id`` (nearest wins, 0 elsewhere)."""
    ids = [i for i, t in enumerate(points.tracks) if image_id in t]
    depth = np.zeros((height, width), np.float32)
    if not ids:
        return depth
    X = torch.as_tensor(points.xyz[ids])
    cam = X @ w2c[:3, :3].T.to(X) + w2c[:3, 3].to(X)
    z = cam[:, 2]
    uv = (cam @ K.T.to(X))[:, :2] / z[:, None].clamp_min(1e-12)
    col, row = uv[:, 0].floor().long(), uv[:, 1].floor().long()  # corner origin: pixel i spans [i, i+1)
    ok = (z > 0) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    order = torch.argsort(z[ok], descending=True)  # far first, so nearer points overwrite them
    r, c, zz = row[ok][order].numpy(), col[ok][order].numpy(), z[ok][order].numpy()
    depth[r, c] = zz
    return depth


def import_scene(
    src: str | Path,
    dst: str | Path,
    *,
    images: str | None = None,
    model: str | None = None,
    no_points: bool = False,
    downscale_factor: int = 1,
    max_frames: int | None = None,
    frame_format: str = "png",
    fps: float = 30.0,
    overwrite: bool = False,
) -> list[Path]:
    src = Path(src)
    folder = Path(model) if model else find_model(src)
    image_dir = Path(images) if images else src / "images"
    cams, imgs = read_model(folder)
    file = folder / ("images.bin" if (folder / "images.bin").is_file() else "images.txt")
    if not imgs:
        raise SceneFormatError(file, "images", "at least one registered image", "none")
    order = sorted(imgs.values(), key=lambda im: im.name)[: max_frames or None]
    rgb, Ks, w2cs, distortion = [], [], [], {}
    for im in order:
        if im.camera_id not in cams:
            raise SceneFormatError(
                file, f"image {im.id} ({im.name}).camera_id", "a camera in the cameras file", im.camera_id
            )
        cam = cams[im.camera_id]
        k, dist = intrinsics(cam, folder / "cameras")
        if any(dist):
            distortion[im.name] = dist
        frame = read_image(image_dir / im.name, file, f"image {im.id} ({im.name})")
        if frame.shape[:2] != (cam.height, cam.width):
            raise SceneFormatError(
                image_dir / im.name,
                "<size>",
                f"{cam.width}x{cam.height} (camera {cam.id})",
                f"{frame.shape[1]}x{frame.shape[0]}",
            )
        if rgb and frame.shape != rgb[0].shape:
            raise SceneFormatError(
                file, f"image {im.id} ({im.name})", f"one image size {rgb[0].shape[:2]}", frame.shape[:2]
            )
        R = quaternion_to_matrix(torch.tensor(im.qvec, dtype=torch.float64))
        w2cs.append(make_rigid(R, torch.tensor(im.tvec, dtype=torch.float64)))
        Ks.append(k)
        rgb.append(frame)
    if distortion:
        warnings.warn(
            f"{folder}: lens distortion is not undone by the import ({len(distortion)} images)", stacklevel=2
        )
    K = make_intrinsics(*torch.tensor(Ks, dtype=torch.float64).unbind(-1))
    frames, K = downscale(np.stack(rgb)[:, None], K, downscale_factor)
    extra = {"image_names": [im.name for im in order], "image_ids": [im.id for im in order]}
    w2c = torch.stack(w2cs)
    points = None if no_points else read_points3d(folder)
    depth = None
    if points is not None:
        h, w = frames.shape[2:4]
        depth = np.stack([sparse_depth(points, im.id, K[v], w2c[v], h, w) for v, im in enumerate(order)])
        depth = depth[:, None]  # [V, T=1, H, W]
    if distortion:
        extra["distortion"] = distortion
    return [
        write_imported(
            dst,
            frames,
            K,
            w2c[:, None],
            source=folder,
            fmt="colmap",
            fps=fps,
            extra=extra,
            depth=depth,
            frame_format=frame_format,
            overwrite=overwrite,
        )
    ]
