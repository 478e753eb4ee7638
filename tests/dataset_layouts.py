"""Writers of small datasets in other tools' documented layouts, from known OpenCV cameras.

Each writer converts the cameras into the format's own convention with its own formula (not
fourdgen's importer code), and ``project_*`` projects a world point the way that format defines
it, so importer tests compare two independent routes to the same pixel.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import imageio.v2 as iio
import numpy as np

# ----------------------------------------------------------------------------- known cameras


def look_at_w2c(eye, target=(0.0, 0.0, 0.0), down=(0.0, 1.0, 0.0)) -> np.ndarray:
    """OpenCV w2c ``[4, 4]`` (rows of R: camera x right, y down, z forward in world)."""
    eye, target, down = (np.asarray(v, dtype=np.float64) for v in (eye, target, down))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(down, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R, -R @ eye
    return w2c


def known_cameras(n: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """``K [n, 3, 3]`` (different focal lengths, off-centre principal points) and ``w2c [n, 4, 4]``."""
    Ks, w2cs = [], []
    for i in range(n):
        a = 2 * np.pi * i / n + 0.3
        eye = (3.0 * np.cos(a), -0.5 - 0.2 * i, 3.0 * np.sin(a))
        w2cs.append(look_at_w2c(eye, target=(0.1, 0.0, -0.2)))
        f = 20.0 + 2 * i
        Ks.append(np.array([[f, 0, width / 2 + 0.7], [0, f * 1.05, height / 2 - 0.4], [0, 0, 1.0]]))
    return np.stack(Ks), np.stack(w2cs)


POINT = np.array([0.3, -0.2, 0.25])  # a world point every known camera sees


def project_opencv(K: np.ndarray, w2c: np.ndarray, X: np.ndarray = POINT) -> np.ndarray:
    p = w2c[:3, :3] @ X + w2c[:3, 3]
    return (K @ (p / p[2]))[:2]


def frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random uint8 RGB images ``[n, H, W, 3]``."""
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- nerfstudio


def gl_c2w(w2c: np.ndarray) -> np.ndarray:
    """OpenGL camera-to-world: camera axes (right, up, back) as columns."""
    c2w = np.linalg.inv(w2c)
    return c2w @ np.diag([1.0, -1.0, -1.0, 1.0])


def project_gl(fx, fy, cx, cy, c2w_gl: np.ndarray, X: np.ndarray = POINT) -> np.ndarray:
    p = np.linalg.inv(c2w_gl) @ np.append(X, 1.0)
    return np.array([cx + fx * p[0] / -p[2], cy - fy * p[1] / -p[2]])


def write_transforms(
    root: Path, K, w2c, images, times=None, per_frame_intrinsics=False, name="transforms.json"
):
    """A nerfstudio ``transforms.json`` (images under ``images/``); ``times``: D-NeRF ``time`` keys."""
    root.mkdir(parents=True, exist_ok=True)
    H, W = images.shape[1:3]
    meta = {"camera_model": "OPENCV", "w": W, "h": H, "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0}
    if not per_frame_intrinsics:
        meta.update(fl_x=K[0, 0, 0], fl_y=K[0, 1, 1], cx=K[0, 0, 2], cy=K[0, 1, 2])
    out = []
    for i, img in enumerate(images):
        rel = f"images/frame_{i:05d}.png"
        (root / "images").mkdir(exist_ok=True)
        iio.imwrite(root / rel, img)
        fm = {"file_path": rel, "transform_matrix": gl_c2w(w2c[i]).tolist()}
        if per_frame_intrinsics:
            fm.update(fl_x=K[i, 0, 0], fl_y=K[i, 1, 1], cx=K[i, 0, 2], cy=K[i, 1, 2])
        if times is not None:
            fm["time"] = float(times[i])
        out.append(fm)
    meta["frames"] = out
    (root / name).write_text(json.dumps(meta))
    return root / name


# ----------------------------------------------------------------------------- COLMAP


def rotmat_to_qvec(R: np.ndarray) -> np.ndarray:
    """(w, x, y, z) of a rotation matrix (Shepperd's method, w >= 0)."""
    w = np.sqrt(max(0.0, 1 + np.trace(R))) / 2
    x = np.copysign(np.sqrt(max(0.0, 1 + R[0, 0] - R[1, 1] - R[2, 2])) / 2, R[2, 1] - R[1, 2])
    y = np.copysign(np.sqrt(max(0.0, 1 - R[0, 0] + R[1, 1] - R[2, 2])) / 2, R[0, 2] - R[2, 0])
    z = np.copysign(np.sqrt(max(0.0, 1 - R[0, 0] - R[1, 1] + R[2, 2])) / 2, R[1, 0] - R[0, 1])
    return np.array([w, x, y, z])


def project_colmap(params, qvec, tvec, X: np.ndarray = POINT) -> np.ndarray:
    """PINHOLE: ``x = R(q) X + t``, ``u = fx x/z + cx`` (COLMAP's pixel origin is the corner)."""
    w, x, y, z = qvec / np.linalg.norm(qvec)
    R = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )
    p = R @ X + tvec
    fx, fy, cx, cy = params
    return np.array([fx * p[0] / p[2] + cx, fy * p[1] / p[2] + cy])


def colmap_points(w2c) -> list[tuple[np.ndarray, list[int]]]:
    """``(xyz, track image ids)``: POINT seen by every image, and a point twice as far along the
    first camera's ray through POINT (the same pixel; only image 1 observes it)."""
    c = -w2c[0, :3, :3].T @ w2c[0, :3, 3]
    return [(POINT, list(range(1, len(w2c) + 1))), (c + 2 * (POINT - c), [1])]


def write_colmap(root: Path, K, w2c, images, binary=True) -> list[tuple]:
    """``sparse/0/cameras|images|points3D.{bin,txt}`` (PINHOLE, one camera per image) and ``images/``.
    Returns per image ``(params, qvec, tvec)``. Names are written out of order on purpose."""
    model = root / "sparse" / "0"
    model.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    H, W = images.shape[1:3]
    recs = []
    for i, img in enumerate(images):
        iio.imwrite(root / "images" / f"img_{i:03d}.png", img)
        params = (K[i, 0, 0], K[i, 1, 1], K[i, 0, 2], K[i, 1, 2])
        recs.append((i + 1, params, rotmat_to_qvec(w2c[i, :3, :3]), w2c[i, :3, 3], f"img_{i:03d}.png"))
    order = recs[::-1]
    if binary:
        cams = struct.pack("<Q", len(recs))
        imgs = struct.pack("<Q", len(recs))
        for cid, params, q, t, name in order:
            cams += struct.pack("<IiQQ", cid, 1, W, H) + struct.pack("<4d", *params)
            imgs += struct.pack("<I4d3dI", cid, *q, *t, cid) + name.encode() + b"\0"
            pts = [(1.5, 2.5, -1), (3.0, 4.0, 7)]
            imgs += struct.pack("<Q", len(pts)) + b"".join(struct.pack("<ddq", *p) for p in pts)
        (model / "cameras.bin").write_bytes(cams)
        (model / "images.bin").write_bytes(imgs)
        pts = struct.pack("<Q", 2)
        for pid, (xyz, track) in enumerate(colmap_points(w2c), 1):
            pts += struct.pack("<Q3d3BdQ", pid, *xyz, 200, 100, 50, 0.5, len(track))
            pts += b"".join(struct.pack("<II", i, 0) for i in track)
        (model / "points3D.bin").write_bytes(pts)
    else:
        cl = [
            "# Camera list with one line of data per camera:",
            "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
        ]
        il = ["# Image list with two lines of data per image:"]
        for cid, params, q, t, name in order:
            cl.append(f"{cid} PINHOLE {W} {H} " + " ".join(repr(float(p)) for p in params))
            il.append(f"{cid} " + " ".join(repr(float(v)) for v in (*q, *t)) + f" {cid} {name}")
            il.append("1.5 2.5 -1 3.0 4.0 7" if cid % 2 else "")
        (model / "cameras.txt").write_text("\n".join(cl) + "\n")
        (model / "images.txt").write_text("\n".join(il) + "\n")
        pl = ["# 3D point list with one line of data per point:"]
        for pid, (xyz, track) in enumerate(colmap_points(w2c), 1):
            pl.append(
                f"{pid} "
                + " ".join(repr(float(v)) for v in xyz)
                + " 200 100 50 0.5 "
                + " ".join(f"{i} 0" for i in track)
            )
        (model / "points3D.txt").write_text("\n".join(pl) + "\n")
    return [(p, q, t) for _, p, q, t, _ in recs]


# ----------------------------------------------------------------------------- LLFF / N3DV


def llff_rows(K, w2c, height, width) -> np.ndarray:
    """``poses_bounds.npy`` rows ``[n, 17]``: [down, right, back | centre | H, W, f] + near, far.
    LLFF has one focal length and a centred principal point: K must have fx = fy, c = size / 2."""
    rows = []
    for k, m in zip(K, w2c, strict=True):
        c2w = np.linalg.inv(m)
        right, down, fwd, centre = c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3]
        mat = np.stack([down, right, -fwd, centre, [height, width, k[0, 0]]], axis=1)  # [3, 5]
        rows.append(np.concatenate([mat.reshape(-1), [0.5, 10.0]]))
    return np.stack(rows)


def project_llff(row: np.ndarray, X: np.ndarray = POINT) -> np.ndarray:
    m = row[:15].reshape(3, 5)
    down, right, back, centre = m[:, 0], m[:, 1], m[:, 2], m[:, 3]
    H, W, f = m[:, 4]
    d = X - centre
    z = -(d @ back)  # distance in front of the camera
    return np.array([W / 2 + f * (d @ right) / z, H / 2 + f * (d @ down) / z])


# ----------------------------------------------------------------------------- DyCheck / Nerfies


def nerfies_camera(K: np.ndarray, w2c: np.ndarray, width: int, height: int) -> dict:
    R = w2c[:3, :3]
    return {
        "orientation": R.tolist(),
        "position": (-R.T @ w2c[:3, 3]).tolist(),
        "focal_length": K[0, 0],
        "principal_point": [K[0, 2], K[1, 2]],
        "skew": 0.0,
        "pixel_aspect_ratio": K[1, 1] / K[0, 0],
        "radial_distortion": [0.0, 0.0, 0.0],
        "tangential_distortion": [0.0, 0.0],
        "image_size": [width, height],
    }


def project_nerfies(cam: dict, X: np.ndarray = POINT) -> np.ndarray:
    p = np.asarray(cam["orientation"]) @ (X - np.asarray(cam["position"]))
    x, y = p[0] / p[2], p[1] / p[2]
    f, (cx, cy) = cam["focal_length"], cam["principal_point"]
    return np.array([f * x + cam["skew"] * y + cx, f * cam["pixel_aspect_ratio"] * y + cy])


def write_dycheck(root: Path, train, val, width, height, covisible=True, depth=None) -> dict[str, dict]:
    """An iPhone-style capture. ``train``/``val``: lists of ``(name, camera_id, time_id, K, w2c, image)``;
    ``depth``: ``{name: [H, W]}`` lidar maps (written ``[H, W, 1]``). Returns the camera json of every
    frame by name."""
    for name, d in (depth or {}).items():
        (root / "depth" / "1x").mkdir(parents=True, exist_ok=True)
        np.save(root / "depth" / "1x" / f"{name}.npy", d[..., None].astype(np.float32))
    cams = {}
    for split, items in (("train", train), ("val", val)):
        for name, _, _, K, w2c, img in items:
            cams[name] = nerfies_camera(K, w2c, width, height)
            (root / "camera").mkdir(parents=True, exist_ok=True)
            (root / "camera" / f"{name}.json").write_text(json.dumps(cams[name]))
            (root / "rgb" / "1x").mkdir(parents=True, exist_ok=True)
            iio.imwrite(root / "rgb" / "1x" / f"{name}.png", img)
            if split == "val" and covisible:
                cov = np.zeros((height, width), np.uint8)
                cov[:, : width // 2] = 255
                (root / "covisible" / "1x" / "val").mkdir(parents=True, exist_ok=True)
                iio.imwrite(root / "covisible" / "1x" / "val" / f"{name}.png", cov)
        (root / "splits").mkdir(parents=True, exist_ok=True)
        split_doc = {
            "frame_names": [i[0] for i in items],
            "camera_ids": [i[1] for i in items],
            "time_ids": [i[2] for i in items],
        }
        (root / "splits" / f"{split}.json").write_text(json.dumps(split_doc))
    (root / "extra.json").write_text(json.dumps({"fps": 15, "factor": 2}))
    return cams


# ----------------------------------------------------------------------------- Sintel, TUM, Bonn

SINTEL_TAG = 202021.25


def write_dpt(path: Path, depth: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = depth.shape
    path.write_bytes(struct.pack("<fii", SINTEL_TAG, w, h) + depth.astype("<f4").tobytes())


def write_cam(path: Path, K: np.ndarray, w2c: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        struct.pack("<f", SINTEL_TAG) + K.astype("<f8").tobytes() + w2c[:3].astype("<f8").tobytes()
    )


def tum_line(t: float, w2c: np.ndarray) -> str:
    """``timestamp tx ty tz qx qy qz qw`` of the camera-to-world pose of ``w2c``."""
    c2w = np.linalg.inv(w2c)
    w, x, y, z = rotmat_to_qvec(c2w[:3, :3])
    return f"{t:.6f} " + " ".join(f"{v:.9f}" for v in (*c2w[:3, 3], x, y, z, w))


def write_tum(root: Path, w2c: np.ndarray, t_rgb: np.ndarray, t_gt: np.ndarray) -> None:
    """``groundtruth.txt`` (poses at ``t_gt``), ``rgb.txt`` (frames at ``t_rgb``)."""
    root.mkdir(parents=True, exist_ok=True)
    gt = ["# ground truth trajectory", "# timestamp tx ty tz qx qy qz qw"] + [
        tum_line(t, m) for t, m in zip(t_gt, w2c, strict=True)
    ]
    (root / "groundtruth.txt").write_text("\n".join(gt) + "\n")
    rgb = ["# color images", "# timestamp filename"] + [f"{t:.6f} rgb/{t:.6f}.png" for t in t_rgb]
    (root / "rgb.txt").write_text("\n".join(rgb) + "\n")


def write_depth_pngs(root: Path, depth: np.ndarray, factor: float = 5000.0) -> None:
    """``depth/<timestamp>.png`` 16-bit PNGs of ``depth [T, H, W]`` in metres."""
    (root / "depth").mkdir(parents=True, exist_ok=True)
    for t, d in enumerate(depth):
        iio.imwrite(root / "depth" / f"{1000 + t * 0.033:.6f}.png", np.round(d * factor).astype(np.uint16))
