"""Cameras: the one convention of fourdgen, and conversions to the others.

Convention (used by every module, dataset and file):
- OpenCV camera axes: x right, y down, z forward (points in front have z > 0).
- ``K`` [..., 3, 3] in pixels. The image plane origin is the top-left *corner* of the top-left
  pixel, so pixel (col i, row j) has its centre at (i + 0.5, j + 0.5). This is gsplat's
  convention, and it makes resizing an exact scale of ``K`` (see :func:`scale_intrinsics`).
- ``w2c`` [..., 4, 4] world-to-camera rigid transform; ``c2w`` is its inverse.
- A camera path or a grid of cameras just adds leading dimensions: ``w2c [V, T, 4, 4]``.

Conversions: OpenGL axes (:func:`opencv_to_opengl`), VGGT's pose encoding
(:func:`vggt_pose_encoding_to_cameras`, :func:`cameras_to_vggt_pose_encoding`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fourdgen.geometry.rotations import matrix_to_quaternion, quaternion_to_matrix

# OpenCV <-> OpenGL camera axes differ by flipping y and z.
_CV_GL_FLIP = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


def make_intrinsics(fx: float | Tensor, fy: float | Tensor, cx: float | Tensor, cy: float | Tensor) -> Tensor:
    """Build ``K [..., 3, 3]`` from focal lengths and principal point (all in pixels)."""
    ref = next((v for v in (fx, fy, cx, cy) if isinstance(v, Tensor) and v.is_floating_point()), None)
    kw = {"dtype": ref.dtype, "device": ref.device} if ref is not None else {"dtype": torch.float32}
    fx, fy, cx, cy = torch.broadcast_tensors(*(torch.as_tensor(v, **kw) for v in (fx, fy, cx, cy)))
    K = torch.zeros(*fx.shape, 3, 3, **kw)
    K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = fx, fy, cx, cy, 1.0
    return K


def intrinsics_from_fov(fov_x_deg: float, width: int, height: int) -> Tensor:
    """Square-pixel pinhole ``K [3, 3]`` with horizontal field of view ``fov_x_deg``, centred."""
    fx = 0.5 * width / torch.tan(torch.deg2rad(torch.tensor(fov_x_deg, dtype=torch.float64)) / 2)
    return make_intrinsics(float(fx), float(fx), width / 2.0, height / 2.0)


def scale_intrinsics(K: Tensor, sx: float, sy: float) -> Tensor:
    """``K`` for an image resized by factors (sx, sy) (new_size / old_size). Exact under the
    corner-origin convention: every image-plane coordinate scales, including the centre."""
    S = torch.diag(torch.tensor([sx, sy, 1.0], dtype=K.dtype, device=K.device))
    return S @ K


def crop_intrinsics(K: Tensor, left: float, top: float) -> Tensor:
    """``K`` for an image cropped to start at pixel column ``left`` and row ``top``."""
    K = K.clone()
    K[..., 0, 2] -= left
    K[..., 1, 2] -= top
    return K


def invert_rigid(T: Tensor) -> Tensor:
    """Inverse of rigid transforms ``T [..., 4, 4]`` without a general matrix inverse."""
    R, t = T[..., :3, :3], T[..., :3, 3:]
    Rt = R.transpose(-1, -2)
    out = torch.zeros_like(T)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1.0
    return out


def make_rigid(R: Tensor, t: Tensor) -> Tensor:
    """Stack rotation ``R [..., 3, 3]`` and translation ``t [..., 3]`` into ``[..., 4, 4]``."""
    out = torch.zeros(*R.shape[:-2], 4, 4, dtype=R.dtype, device=R.device)
    out[..., :3, :3] = R
    out[..., :3, 3] = t
    out[..., 3, 3] = 1.0
    return out


def camera_centers(w2c: Tensor) -> Tensor:
    """World-space camera centres ``[..., 3]`` of ``w2c [..., 4, 4]`` (C = -R^T t)."""
    R, t = w2c[..., :3, :3], w2c[..., :3, 3:]
    return (-R.transpose(-1, -2) @ t)[..., 0]


def look_at(eye: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """OpenCV ``w2c [..., 4, 4]`` of cameras at ``eye [..., 3]`` looking at ``target [..., 3]``.

    ``up`` is the world's up direction (default +y up, so image rows run along -y: the camera's
    y axis (down) points to world -y). Where the view is parallel to ``up``, world +z (or +x)
    stands in for it so the result stays rigid.
    """
    eye = torch.as_tensor(eye)
    eye = eye if eye.is_floating_point() else eye.float()
    target = torch.as_tensor(target, dtype=eye.dtype, device=eye.device)
    eye, target = torch.broadcast_tensors(eye, target)
    up = torch.tensor([0.0, 1.0, 0.0]) if up is None else torch.as_tensor(up)
    up = up.to(eye).expand_as(eye)
    z = torch.nn.functional.normalize(target - eye, dim=-1)
    for alt in ([0.0, 0.0, 1.0], [1.0, 0.0, 0.0]):  # degenerate: forward parallel to up
        parallel = torch.cross(z, up, dim=-1).norm(dim=-1, keepdim=True) < 1e-6
        up = torch.where(parallel, torch.tensor(alt, dtype=eye.dtype, device=eye.device), up)
    x = torch.nn.functional.normalize(torch.cross(z, up, dim=-1), dim=-1)  # right = forward x up
    y = torch.cross(z, x, dim=-1)
    R = torch.stack([x, y, z], dim=-2)  # rows: camera axes in world coordinates
    t = -(R @ eye[..., None])[..., 0]
    return make_rigid(R, t)


def is_rigid(T: Tensor, atol: float = 1e-4) -> Tensor:
    """Per-matrix check ``[...]`` that ``T`` is a rigid transform (orthonormal R, det +1,
    last row [0, 0, 0, 1])."""
    R = T[..., :3, :3].double()
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    ortho = (R @ R.transpose(-1, -2) - eye).abs().amax(dim=(-1, -2)) <= atol
    det = (torch.linalg.det(R) - 1).abs() <= atol
    bottom = (T[..., 3, :].double() - torch.tensor([0.0, 0, 0, 1], dtype=R.dtype, device=R.device)).abs()
    return ortho & det & (bottom.amax(dim=-1) <= atol)


def opencv_to_opengl(c2w: Tensor) -> Tensor:
    """Camera-to-world in OpenCV axes -> OpenGL/Blender axes (x right, y up, z backward).
    For world-to-camera matrices flip on the left instead: ``invert_rigid(opencv_to_opengl(
    invert_rigid(w2c)))``."""
    return c2w @ _CV_GL_FLIP.to(c2w)


def opengl_to_opencv(c2w: Tensor) -> Tensor:
    """Camera-to-world in OpenGL axes -> OpenCV axes. Its own inverse (flip twice)."""
    return c2w @ _CV_GL_FLIP.to(c2w)


def pixel_centers(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Image-plane coordinates of pixel centres ``[H, W, 2]`` as (u, v) = (col + .5, row + .5)."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype) + 0.5,
        torch.arange(width, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def pixel_rays(K: Tensor, c2w: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """World-space rays through pixel centres.

    Returns ``origins [..., H, W, 3]`` and ``dirs [..., H, W, 3]`` where ``dirs`` are scaled so
    that their camera-z component is 1: a point at depth ``d`` (z-depth) is ``o + d * dirs``.
    ``K [..., 3, 3]``, ``c2w [..., 4, 4]``: leading dims broadcast.
    """
    lead = torch.broadcast_shapes(K.shape[:-2], c2w.shape[:-2])
    K, c2w = K.expand(*lead, 3, 3), c2w.expand(*lead, 4, 4)
    uv = pixel_centers(height, width, device=K.device, dtype=K.dtype)
    fx, fy = K[..., 0, 0], K[..., 1, 1]
    cx, cy = K[..., 0, 2], K[..., 1, 2]
    sh = (*lead, 1, 1)
    x = (uv[..., 0] - cx.reshape(sh)) / fx.reshape(sh)
    y = (uv[..., 1] - cy.reshape(sh)) / fy.reshape(sh)
    d_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # [..., H, W, 3]
    R = c2w[..., :3, :3].reshape(*lead, 1, 1, 3, 3)
    dirs = (R @ d_cam[..., None])[..., 0]
    origins = c2w[..., :3, 3].reshape(*lead, 1, 1, 3).expand_as(dirs)
    return origins, dirs


def focus_point(w2c: Tensor) -> Tensor:
    """The point closest (least squares) to all cameras' optical axes ``[3]``: where a rig of
    ``w2c [N, 4, 4]`` looks. Solves ``sum_i (I - d_i d_i^T) p = sum_i (I - d_i d_i^T) c_i``."""
    w2c = w2c.reshape(-1, 4, 4).double()
    c = camera_centers(w2c)
    d = w2c[:, 2, :3]  # optical axis (camera +z) in world coordinates
    P = torch.eye(3, dtype=w2c.dtype, device=w2c.device) - d[:, :, None] * d[:, None, :]
    A, b = P.sum(0), (P @ c[:, :, None]).sum(0)[:, 0]
    if torch.linalg.matrix_rank(A) < 3:  # parallel axes: no intersection, look ahead of the rig
        return (c.mean(0) + d.mean(0)).float()
    return torch.linalg.solve(A, b).float()


def vggt_pose_encoding_to_cameras(pose_enc: Tensor, image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """VGGT's ``absT_quaR_FoV`` encoding ``[..., 9]`` (w2c translation, w2c rotation as quaternion
    xyzw, fov_h, fov_w in radians) -> ``K [..., 3, 3]``, ``w2c [..., 4, 4]``.

    VGGT unprojects pixel (i, j) at (i, j) with its principal point at (W/2, H/2): in this module's
    pixel-centre convention that is (W/2 + 0.5, H/2 + 0.5). Fields of view are clamped to
    [1, 179] degrees: an untrained head's ReLU gives 0, an infinite focal length and NaN gradients
    in any renderer downstream.
    """
    H, W = image_hw
    t, q = pose_enc[..., :3], pose_enc[..., 3:7]
    fov = pose_enc[..., 7:9].clamp(math.radians(1.0), math.radians(179.0))
    R = quaternion_to_matrix(torch.cat([q[..., 3:], q[..., :3]], dim=-1))  # xyzw -> wxyz
    w2c = torch.zeros(*pose_enc.shape[:-1], 4, 4, dtype=pose_enc.dtype, device=pose_enc.device)
    w2c[..., :3, :3], w2c[..., :3, 3], w2c[..., 3, 3] = R, t, 1.0
    fx = (W / 2.0) / torch.tan(fov[..., 1] / 2.0)
    fy = (H / 2.0) / torch.tan(fov[..., 0] / 2.0)
    return make_intrinsics(fx, fy, W / 2.0 + 0.5, H / 2.0 + 0.5), w2c


def cameras_to_vggt_pose_encoding(K: Tensor, w2c: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Inverse of :func:`vggt_pose_encoding_to_cameras` (the principal point is not encoded):
    ``K [..., 3, 3]``, ``w2c [..., 4, 4]`` -> ``[..., 9]``, e.g. targets for a camera loss."""
    H, W = image_hw
    q = matrix_to_quaternion(w2c[..., :3, :3])  # wxyz
    fov_h = 2 * torch.atan((H / 2.0) / K[..., 1, 1])
    fov_w = 2 * torch.atan((W / 2.0) / K[..., 0, 0])
    return torch.cat([w2c[..., :3, 3], q[..., 1:], q[..., :1], fov_h[..., None], fov_w[..., None]], dim=-1)
