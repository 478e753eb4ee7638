"""Camera trajectories on Sintel and TUM-dynamics (One4D table 4, MonST3R's protocol): ATE,
RPE-T and RPE-R (degrees) after a sim(3) Umeyama alignment (evo's ``--align --correct_scale``,
:func:`fourdgen.metrics.camera.camera_metrics`), plain mean over sequences. Ground truth:

- Sintel: ``<root>/training/camdata_left/<seq>/frame_XXXX.cam``, every frame.
- TUM: ``<root>/<seq>/groundtruth.txt`` at the timestamps of ``rgb.txt``'s frames (nearest pose
  within 20 ms), the first 90 frames with stride 3 (30 frames, MonST3R's ``rgb_90``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fourdgen.data.scene import SceneFormatError
from fourdgen.evaluation.predictions import read_camera_prediction
from fourdgen.evaluation.readers import associate, read_file_list, read_sintel_cam, read_tum_trajectory
from fourdgen.metrics.camera import camera_metrics


@dataclass(frozen=True)
class CameraProtocol:
    stride: int = 1
    count: int | None = None  # frames before the stride is applied (None: all)


PROTOCOLS = {"sintel": CameraProtocol(), "tum": CameraProtocol(stride=3, count=90)}


def sequences(dataset: str, root: Path) -> list[str]:
    if dataset == "sintel":
        return sorted(p.name for p in (root / "training" / "camdata_left").glob("*") if p.is_dir())
    return sorted(p.name for p in root.glob("*") if (p / "groundtruth.txt").is_file())


def load_gt_cameras(dataset: str, root: Path, seq: str, protocol: CameraProtocol) -> np.ndarray:
    """Ground-truth OpenCV ``w2c [T, 4, 4]`` of one sequence under the protocol."""
    if dataset == "sintel":
        files = sorted((root / "training" / "camdata_left" / seq).glob("*.cam"))
        w2c = np.stack([read_sintel_cam(f)[1] for f in files]) if files else np.zeros((0, 4, 4))
    else:
        d = root / seq
        t_rgb, _ = read_file_list(d / "rgb.txt")
        t_gt, w2c_gt = read_tum_trajectory(d / "groundtruth.txt")
        pairs = dict(associate(t_rgb, t_gt))
        missing = [i for i in range(min(len(t_rgb), protocol.count or len(t_rgb))) if i not in pairs]
        if missing:
            raise SceneFormatError(
                d / "groundtruth.txt", "timestamp", f"a pose within 20 ms of rgb frame {missing[0]}", "none"
            )
        w2c = np.stack([w2c_gt[pairs[i]] for i in range(len(t_rgb)) if i in pairs])
    w2c = w2c[: protocol.count][:: protocol.stride]
    if len(w2c) == 0:
        raise SceneFormatError(root / seq, "cameras", "ground-truth poses", "none")
    return w2c


def evaluate_cameras(
    dataset: str,
    gt_root: str | Path,
    pred_root: str | Path,
    sequences_: list[str] | None = None,
    protocol: CameraProtocol | None = None,
) -> dict[str, dict[str, float]]:
    """``{seq: {"ate", "rpe_t", "rpe_r"}, ..., "mean": plain mean over sequences}``."""
    gt_root, pred_root = Path(gt_root), Path(pred_root)
    protocol = protocol or PROTOCOLS[dataset]
    seqs = sequences_ or sequences(dataset, gt_root)
    if not seqs:
        raise SceneFormatError(
            gt_root, "<folder>", f"{dataset} sequences in the documented layout", "none found"
        )
    out = {}
    for seq in seqs:
        gt = load_gt_cameras(dataset, gt_root, seq, protocol)
        pred = read_camera_prediction(pred_root, seq, len(gt))
        out[seq] = camera_metrics(torch.as_tensor(pred), torch.as_tensor(gt))
    out["mean"] = {k: float(np.mean([r[k] for r in out.values()])) for k in ("ate", "rpe_t", "rpe_r")}
    return out
