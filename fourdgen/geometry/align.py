"""Similarity / rigid alignment of point sets and camera trajectories (Umeyama 1991).

Used by evaluation: predicted geometry lives in an arbitrary frame (and, for monocular methods,
an arbitrary scale), so it is aligned onto ground truth before errors are measured.
Cameras follow :mod:`fourdgen.geometry.cameras` (OpenCV ``w2c [..., 4, 4]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fourdgen.geometry.cameras import camera_centers, invert_rigid, make_rigid


def _out_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float64


def umeyama(src: Tensor, dst: Tensor, with_scale: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares similarity ``dst ~= s * R @ src + t``.

    Args:
        src: ``[N, 3]`` source points.
        dst: ``[N, 3]`` corresponding target points.
        with_scale: estimate ``s``; otherwise ``s = 1`` (rigid Procrustes).

    Returns:
        ``s`` (scalar tensor), ``R [3, 3]`` (a proper rotation, det +1, even when the best
        orthogonal fit is a reflection), ``t [3]``; in ``src``'s floating dtype. Computed in float64.
    """
    if src.shape != dst.shape or src.ndim != 2 or src.shape[-1] != 3:
        raise ValueError(
            f"umeyama expects matching [N, 3] point sets, got {tuple(src.shape)}, {tuple(dst.shape)}"
        )
    dtype = _out_dtype(src)
    x, y = src.double(), dst.double().to(src.device)
    mu_x, mu_y = x.mean(0), y.mean(0)
    xc, yc = x - mu_x, y - mu_y
    cov = yc.T @ xc / x.shape[0]  # [3, 3] cross-covariance dst-src
    U, D, Vh = torch.linalg.svd(cov)
    # Flip the weakest axis when U @ Vh is a reflection: the closest proper rotation (Umeyama eq. 39).
    S = torch.ones(3, dtype=x.dtype, device=x.device)
    if torch.linalg.det(U) * torch.linalg.det(Vh) < 0:
        S[-1] = -1.0
    R = U @ torch.diag(S) @ Vh
    if with_scale:
        var_x = (xc**2).sum(-1).mean()
        # A single repeated point has no scale information; keep s = 1 rather than divide by 0.
        s = (D * S).sum() / var_x if var_x > torch.finfo(x.dtype).tiny else torch.ones_like(var_x)
    else:
        s = torch.ones((), dtype=x.dtype, device=x.device)
    t = mu_y - s * (R @ mu_x)
    return s.to(dtype), R.to(dtype), t.to(dtype)


def procrustes(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rigid fit ``dst ~= R @ src + t``: :func:`umeyama` without scale. Returns ``(s=1, R, t)``
    so it can be swapped for :func:`umeyama` and fed to :func:`apply_similarity`."""
    return umeyama(src, dst, with_scale=False)


def apply_similarity(points: Tensor, s: Tensor | float, R: Tensor, t: Tensor) -> Tensor:
    """``s * R @ p + t`` for ``points [..., 3]``; returns ``[..., 3]`` in ``points``' dtype."""
    R, t = R.to(points), t.to(points)
    s = torch.as_tensor(s, dtype=points.dtype, device=points.device)
    return s * (points @ R.T) + t


def similarity_w2c(w2c: Tensor, s: Tensor | float, R: Tensor, t: Tensor) -> Tensor:
    """Move cameras ``w2c [..., 4, 4]`` by the world similarity ``x -> s R x + t``.

    The camera centre maps like a point; the camera's orientation turns with ``R`` (the camera
    sees the transformed world exactly as before, up to the scale of depths).
    """
    w2c64 = w2c.double()
    R64, t64 = R.to(w2c64), t.to(w2c64)
    s64 = torch.as_tensor(s, dtype=torch.float64, device=w2c.device)
    c2w = invert_rigid(w2c64)
    c2w_rot = R64 @ c2w[..., :3, :3]
    center = apply_similarity(c2w[..., :3, 3], s64, R64, t64)
    return invert_rigid(make_rigid(c2w_rot, center)).to(w2c.dtype)


def align_cameras(w2c_pred: Tensor, w2c_gt: Tensor, with_scale: bool = True) -> Tensor:
    """Align a predicted trajectory onto ground truth by its camera centres.

    Fits :func:`umeyama` from predicted to ground-truth centres and applies it to the whole
    predicted poses (centres and rotations), as evo / MonST3R / CUT3R evaluation does.

    Args:
        w2c_pred: ``[N, 4, 4]`` predicted world-to-camera poses.
        w2c_gt: ``[N, 4, 4]`` ground-truth world-to-camera poses.
        with_scale: also fit a global scale (monocular predictions have none).

    Returns:
        ``[N, 4, 4]`` aligned predicted w2c, in ``w2c_pred``'s dtype.
    """
    if w2c_pred.shape != w2c_gt.shape or w2c_pred.ndim != 3 or w2c_pred.shape[-2:] != (4, 4):
        raise ValueError(
            f"align_cameras expects [N, 4, 4] poses, got {tuple(w2c_pred.shape)}, {tuple(w2c_gt.shape)}"
        )
    c_pred = camera_centers(w2c_pred.double())
    c_gt = camera_centers(w2c_gt.double().to(w2c_pred.device))
    s, R, t = umeyama(c_pred, c_gt, with_scale=with_scale)
    return similarity_w2c(w2c_pred, s, R, t)


def depth_from_fit(pred: Tensor, a: Tensor | float, b: Tensor | float, space: str = "disparity") -> Tensor:
    """Depth ``[..., H, W]`` (pred's dtype) of the fitted ``a * pred + b``: its inverse for
    ``space="disparity"``, itself for ``"depth"``; 0 (unknown) where that is <= 0 or not finite."""
    fit = a * pred.double() + b
    if space == "disparity":
        depth = torch.where(fit > 0, 1.0 / fit.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    else:
        depth = fit.clamp_min(0.0)
    # Cast first: a tiny positive disparity overflows float32 to inf, which is unknown too.
    return depth.to(_out_dtype(pred)).nan_to_num(0.0, posinf=0.0, neginf=0.0)


def align_depth(
    pred: Tensor,
    ref: Tensor,
    valid: Tensor | None = None,
    space: str = "disparity",
    mode: str = "scale_shift",
    return_params: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Fit a monocular prediction to a reference depth and return it as depth.

    Least squares of ``a * pred + b`` (``mode="scale_shift"``) or ``a * pred`` (``"scale"``) against
    the reference in the prediction's space: ``1 / ref`` for ``space="disparity"`` (relative models:
    affine-invariant inverse depth), ``ref`` itself for ``"depth"``. One fit over every given pixel
    (all leading dims together, e.g. all frames of a view: one scale for the whole clip, no flicker),
    on the pixels that are ``valid`` with ``ref > 0`` and finite. Computed in float64.

    Args:
        pred: ``[..., H, W]`` prediction (disparity or depth, per ``space``).
        ref: ``[..., H, W]`` reference z-depth, 0 = unknown.
        valid: ``[..., H, W]`` bool, pixels allowed in the fit (None: all).

    Returns:
        Aligned z-depth ``[..., H, W]`` in ``pred``'s dtype, on every pixel: for disparity
        ``1 / (a * pred + b)``, with depth 0 (unknown) where the aligned disparity is <= 0; for depth
        ``a * pred + b`` with negative values set to 0. With ``return_params``: ``(depth, a, b)``,
        ``a``/``b`` float64 scalars (``b = 0`` for ``"scale"``).
    """
    if space not in ("disparity", "depth"):
        raise ValueError(f"align_depth: space must be 'disparity' or 'depth', got {space!r}")
    if mode not in ("scale_shift", "scale"):
        raise ValueError(f"align_depth: mode must be 'scale_shift' or 'scale', got {mode!r}")
    if pred.shape != ref.shape or (valid is not None and valid.shape != pred.shape):
        shapes = [tuple(pred.shape), tuple(ref.shape)] + ([tuple(valid.shape)] if valid is not None else [])
        raise ValueError(f"align_depth: pred, ref and valid must share one shape [..., H, W], got {shapes}")
    p, r = pred.double(), ref.double().to(pred.device)
    use = (r > 0) & torch.isfinite(r) & torch.isfinite(p)
    if valid is not None:
        use = use & valid.to(device=pred.device, dtype=torch.bool)
    x, y = p[use], r[use]
    if space == "disparity":
        y = 1.0 / y
    need = 2 if mode == "scale_shift" else 1
    if x.numel() < need:
        raise ValueError(f"align_depth ({mode}): needs >= {need} valid reference pixels, got {x.numel()}")
    if mode == "scale_shift":
        # Centred normal equations: the closed form of lstsq([x, 1], y), without an [N, 2] matrix.
        mx, my = x.mean(), y.mean()
        var = ((x - mx) ** 2).mean()
        if var <= 1e-12 * (x * x).mean():  # relative: float32 inputs resolve ~1e-7
            raise ValueError("align_depth (scale_shift): the prediction is constant over the valid pixels")
        a = ((x - mx) * (y - my)).mean() / var
        b = my - a * mx
    else:
        xx = (x * x).sum()
        if xx <= 0:
            raise ValueError("align_depth (scale): the prediction is zero over the valid pixels")
        a, b = (x * y).sum() / xx, torch.zeros((), dtype=torch.float64, device=pred.device)
    depth = depth_from_fit(pred, a, b, space)
    return (depth, a, b) if return_params else depth
