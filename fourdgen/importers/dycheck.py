"""DyCheck iPhone (and Nerfies / HyperNeRF) captures -> one scene per split camera.

Layout (DyCheck's docs/DATASETS.md, the Nerfies format it extends)::

    camera/<frame>.json          {"orientation": 3x3 world-to-camera rotation, "position": [3] centre,
                                  "focal_length": f, "principal_point": [cx, cy], "skew": s,
                                  "pixel_aspect_ratio": a, "radial_distortion": [...],
                                  "tangential_distortion": [...], "image_size": [W, H]}
    rgb/<s>x/<frame>.png         frames at 1/s resolution
    splits/<split>.json          {"frame_names": [...], "camera_ids": [...], "time_ids": [...]}
    covisible/<s>x/<split>/<frame>.png   optional: 1 where the test pixel was seen in training
    depth/<s>x/<frame>.npy       optional: lidar z-depth [H, W, 1] of the training frames
    extra.json                   optional: "fps"

Nerfies' cameras are OpenCV (x right, y down, z forward) with ``x_cam = R (x - position)``, and
its rays pass through pixel centres ``i + 0.5``: ``w2c = [R | -R position]`` and
``K = [[f, s, cx], [0, a f, cy], [0, 0, 1]]`` (scaled by ``1/s`` for ``rgb/<s>x``).

Writes ``<dst>/train/`` (the training cameras over the training times: one moving camera on the
iPhone data) and ``<dst>/val_<camera>/`` for each validation camera over its own times, with the
covisibility masks as ``covisible/<view>.npy`` (uint8 ``[T, H, W]``, 1 = covisible; the scene's
``covisible`` key names them). ``time_ids`` and ``frame_names`` keep the dataset's ids.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fourdgen.data.scene import SceneFormatError
from fourdgen.geometry.cameras import make_rigid, scale_intrinsics
from fourdgen.importers.common import array, field, load_json, number, read_image, rigid_w2c, write_imported
from fourdgen.io import atomic_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", type=int, default=1, help="read rgb/<scale>x (and covisible/<scale>x)")
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="split files to import")


def read_camera(file: Path) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """``(K [3, 3], w2c [4, 4], (W, H))`` of a Nerfies camera json, at full (1x) resolution."""
    c = load_json(file)
    R = array(field(c, "orientation", file, "a 3x3 rotation"), file, "orientation", (3, 3))
    pos = array(field(c, "position", file, "a 3-vector"), file, "position", (3,))
    f = number(
        field(c, "focal_length", file, "a focal length in pixels"), file, "focal_length", positive=True
    )
    pp = array(field(c, "principal_point", file, "[cx, cy]"), file, "principal_point", (2,))
    skew = number(c.get("skew", 0.0), file, "skew")
    aspect = number(c.get("pixel_aspect_ratio", 1.0), file, "pixel_aspect_ratio", positive=True)
    size = array(field(c, "image_size", file, "[W, H]"), file, "image_size", (2,))
    dist = [*c.get("radial_distortion", []), *c.get("tangential_distortion", [])]
    if any(isinstance(d, (int, float)) and d for d in dist):
        warnings.warn(f"{file}: lens distortion {dist} is not undone by the import", stacklevel=2)
    Rt = torch.as_tensor(R)
    w2c = rigid_w2c(make_rigid(Rt, -Rt @ torch.as_tensor(pos))[None], file, "orientation")[0]
    K = torch.tensor([[f, skew, pp[0]], [0.0, f * aspect, pp[1]], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return K, w2c, (int(size[0]), int(size[1]))


def read_split(file: Path) -> list[tuple[str, int, int]]:
    """``(frame_name, camera_id, time_id)`` of every frame of a split file."""
    s = load_json(file)
    cols = [field(s, k, file, "a list") for k in ("frame_names", "camera_ids", "time_ids")]
    if not all(isinstance(c, list) for c in cols):
        raise SceneFormatError(file, "frame_names", "lists frame_names, camera_ids, time_ids")
    if len({len(c) for c in cols}) != 1:
        raise SceneFormatError(
            file, "camera_ids", f"as many entries as frame_names ({len(cols[0])})", len(cols[1])
        )
    return [(str(n), int(c), int(t)) for n, c, t in zip(*cols, strict=True)]


def _covisible(root: Path, scale: int, split: str, names: list[str]) -> np.ndarray | None:
    paths = [root / "covisible" / f"{scale}x" / split / f"{n}.png" for n in names]
    if not all(p.is_file() for p in paths):
        return None
    return np.stack([(read_image(p, p, "<mask>")[..., 0] > 127).astype(np.uint8) for p in paths])


def _depth(root: Path, scale: int, names: list[list[str]], hw: tuple[int, int]) -> np.ndarray | None:
    """``[V, T, H, W]`` lidar z-depth from ``depth/<s>x/<frame>.npy`` when every frame has one.
    Kept in the capture's raw units, like the cameras (scene.json's normalisation is not applied)."""
    paths = [[root / "depth" / f"{scale}x" / f"{n}.npy" for n in row] for row in names]
    if not all(p.is_file() for row in paths for p in row):
        return None
    out = []
    for row in paths:
        maps = [np.load(p).astype(np.float32) for p in row]
        for p, d in zip(row, maps, strict=True):
            if d.shape[:2] != hw or d.ndim not in (2, 3) or d.size != hw[0] * hw[1]:
                raise SceneFormatError(
                    p, "<array>", f"depth [{hw[0]}, {hw[1]}] (or [H, W, 1])", list(d.shape)
                )
        out.append(np.stack([d.reshape(hw) for d in maps]))
    return np.nan_to_num(np.stack(out), nan=0.0, posinf=0.0, neginf=0.0)


def _write_group(
    root: Path, dst: Path, split: str, frames: list[tuple[str, int, int]], scale: int, fps: float, opts: dict
) -> Path:
    """One scene of the given frames: one view per camera id, columns = sorted time ids."""
    split_file = root / "splits" / f"{split}.json"
    cams = sorted({c for _, c, _ in frames})
    times = sorted({t for _, _, t in frames})
    by = {(c, t): n for n, c, t in frames}
    missing = [(c, t) for c in cams for t in times if (c, t) not in by]
    if missing:
        c, t = missing[0]
        raise SceneFormatError(
            split_file, "time_ids", f"a frame of every camera at every time (camera {c})", f"none at time {t}"
        )
    names = [[by[c, t] for t in times] for c in cams]
    rgb, Ks, w2cs = [], [], []
    for row in names:
        Ks_row, w2c_row, imgs = [], [], []
        for n in row:
            K, w2c, (W, H) = read_camera(root / "camera" / f"{n}.json")
            img_file = root / "rgb" / f"{scale}x" / f"{n}.png"
            img = read_image(img_file, split_file, f"frame_names[{n}]")
            if img.shape[:2] != (round(H / scale), round(W / scale)):
                raise SceneFormatError(
                    img_file, "<size>", f"{W}x{H} / {scale} (camera/{n}.json image_size)", img.shape[1::-1]
                )
            Ks_row.append(scale_intrinsics(K, 1 / scale, 1 / scale))
            w2c_row.append(w2c)
            imgs.append(img)
        if any(not torch.allclose(k, Ks_row[0]) for k in Ks_row):
            raise SceneFormatError(root / "camera", f"{row[0]}.json", "one intrinsics per camera over time")
        Ks.append(Ks_row[0])
        w2cs.append(torch.stack(w2c_row))
        rgb.append(np.stack(imgs))
    cov = [_covisible(root, scale, split, row) for row in names]
    depth = _depth(root, scale, names, rgb[0].shape[1:3])
    extra: dict[str, Any] = {"split": split, "camera_ids": cams, "time_ids": times, "frame_names": names}
    views = [f"cam{c:02d}" for c in cams]
    if all(c is not None for c in cov):
        extra["covisible"] = [f"covisible/{v}.npy" for v in views]
    out = write_imported(
        dst,
        np.stack(rgb),
        torch.stack(Ks),
        torch.stack(w2cs),
        source=root,
        fmt="dycheck",
        fps=fps,
        view_names=views,
        extra=extra,
        depth=depth,
        **opts,
    )
    for rel, arr in zip(extra.get("covisible", []), cov, strict=False):
        with atomic_path(out / rel) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    return out


def import_scene(
    src: str | Path,
    dst: str | Path,
    *,
    scale: int = 1,
    splits: list[str] | None = None,
    downscale_factor: int = 1,
    max_frames: int | None = None,
    frame_format: str = "png",
    fps: float | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """``<dst>/train`` and ``<dst>/val_<camera>`` (one per validation camera)."""
    root, dst = Path(src), Path(dst)
    if downscale_factor != 1:
        scale *= downscale_factor  # DyCheck ships its own downscaled frames: read rgb/<s>x
    extra_file = root / "extra.json"
    fps = fps or (float(load_json(extra_file).get("fps", 30.0)) if extra_file.is_file() else 30.0)
    opts = {"frame_format": frame_format, "overwrite": overwrite}
    out = []
    for split in splits or ["train", "val"]:
        file = root / "splits" / f"{split}.json"
        if split != "train" and not file.is_file():
            continue  # single-camera captures have no validation split
        frames = read_split(file)
        if max_frames:
            keep = sorted({t for _, _, t in frames})[:max_frames]
            frames = [f for f in frames if f[2] in keep]
        if split == "train":
            out.append(_write_group(root, dst / "train", split, frames, scale, fps, opts))
            continue
        for cam in sorted({c for _, c, _ in frames}):
            group = [f for f in frames if f[1] == cam]
            out.append(_write_group(root, dst / f"{split}_{cam}", split, group, scale, fps, opts))
    return out
