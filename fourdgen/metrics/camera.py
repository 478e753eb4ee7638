"""Camera trajectory metrics: ATE and RPE, as in MonST3R / CUT3R video-pose evaluation.

Both follow evo (``evo_ape`` / ``evo_rpe`` with ``--align --correct_scale``, ``delta=1`` frame):
the predicted trajectory is first aligned onto ground truth by a Umeyama similarity fitted on
camera centres, and errors are reported as RMSE. Poses are OpenCV ``w2c [N, 4, 4]``
(see :mod:`fourdgen.geometry.cameras`); translations are in ground-truth world units.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fourdgen.geometry.align import align_cameras
from fourdgen.geometry.cameras import camera_centers, invert_rigid
from fourdgen.geometry.rotations import rotation_angle


def _check(w2c_pred: Tensor, w2c_gt: Tensor, min_frames: int) -> None:
    if w2c_pred.shape != w2c_gt.shape or w2c_pred.ndim != 3 or w2c_pred.shape[-2:] != (4, 4):
        raise ValueError(
            f"expected matching [N, 4, 4] poses, got {tuple(w2c_pred.shape)}, {tuple(w2c_gt.shape)}"
        )
    if w2c_pred.shape[0] < min_frames:
        raise ValueError(f"need at least {min_frames} frames, got {w2c_pred.shape[0]}")


def _ate(aligned: Tensor, w2c_gt: Tensor) -> Tensor:
    err = camera_centers(aligned) - camera_centers(w2c_gt)
    return err.square().sum(-1).mean().sqrt()


def _rpe(aligned: Tensor, w2c_gt: Tensor) -> tuple[Tensor, Tensor]:
    # evo's relative pose of frame i -> i+1 on camera-to-world poses P: P_i^-1 P_{i+1};
    # error E = rel_gt^-1 rel_pred. With w2c, P_i^-1 P_{i+1} = w2c_i c2w_{i+1}.
    def rel(w2c: Tensor) -> Tensor:
        return w2c[:-1] @ invert_rigid(w2c[1:])

    E = invert_rigid(rel(w2c_gt)) @ rel(aligned)
    trans = E[:, :3, 3].norm(dim=-1)
    rot = torch.rad2deg(rotation_angle(E[:, :3, :3]))
    return trans.square().mean().sqrt(), rot.square().mean().sqrt()


def ate(w2c_pred: Tensor, w2c_gt: Tensor, with_scale: bool = True) -> Tensor:
    """Absolute trajectory error: RMSE of camera centres after Umeyama alignment.

    ``w2c_pred``, ``w2c_gt``: ``[N, 4, 4]``. Returns a float64 scalar tensor.
    """
    _check(w2c_pred, w2c_gt, 1)
    gt = w2c_gt.double().to(w2c_pred.device)
    return _ate(align_cameras(w2c_pred.double(), gt, with_scale=with_scale), gt)


def rpe(w2c_pred: Tensor, w2c_gt: Tensor, with_scale: bool = True) -> tuple[Tensor, Tensor]:
    """Relative pose error over consecutive frame pairs, after the same alignment as :func:`ate`.

    ``w2c_pred``, ``w2c_gt``: ``[N, 4, 4]`` with N >= 2. Returns ``(rpe_trans, rpe_rot_deg)``:
    RMSE over the N-1 pairs of the translation norm and of the rotation angle (degrees) of
    ``E_i = (gt_i^-1 gt_{i+1})^-1 (pred_i^-1 pred_{i+1})`` on camera-to-world poses.
    """
    _check(w2c_pred, w2c_gt, 2)
    gt = w2c_gt.double().to(w2c_pred.device)
    return _rpe(align_cameras(w2c_pred.double(), gt, with_scale=with_scale), gt)


def camera_metrics(w2c_pred: Tensor, w2c_gt: Tensor, with_scale: bool = True) -> dict[str, float]:
    """``{"ate", "rpe_t", "rpe_r"}`` (``rpe_r`` in degrees) from one alignment of ``[N, 4, 4]``
    poses. ``rpe_*`` are NaN when N < 2."""
    _check(w2c_pred, w2c_gt, 1)
    gt = w2c_gt.double().to(w2c_pred.device)
    aligned = align_cameras(w2c_pred.double(), gt, with_scale=with_scale)
    out = {"ate": float(_ate(aligned, gt)), "rpe_t": math.nan, "rpe_r": math.nan}
    if gt.shape[0] >= 2:
        rpe_t, rpe_r = _rpe(aligned, gt)
        out.update(rpe_t=float(rpe_t), rpe_r=float(rpe_r))
    return out
