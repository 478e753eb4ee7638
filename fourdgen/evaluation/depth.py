"""Video depth on Sintel and Bonn (One4D table 3, MonST3R's protocol): AbsRel and delta < 1.25.

Each sequence is aligned once (:func:`fourdgen.metrics.video_depth.video_depth_metrics`) and the
sequences are averaged weighted by their valid pixels. Ground truth:

- Sintel: ``<root>/training/depth/<seq>/frame_XXXX.dpt``, every frame, depth cap 70.
- Bonn: ``<root>/<seq>/depth/*.png`` (16-bit, / 5000; or the files ``depth.txt`` lists), frames
  30-139 (110 frames, as MonST3R), depth cap 70.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fourdgen.data.scene import SceneFormatError
from fourdgen.evaluation.predictions import read_depth_prediction
from fourdgen.evaluation.readers import read_depth_png, read_file_list, read_sintel_depth
from fourdgen.metrics.video_depth import average_sequences, video_depth_metrics


@dataclass(frozen=True)
class DepthProtocol:
    max_depth: float = 70.0
    start: int = 0
    count: int | None = None  # None: every frame from start


PROTOCOLS = {"sintel": DepthProtocol(), "bonn": DepthProtocol(start=30, count=110)}


def sintel_sequences(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "training" / "depth").glob("*") if p.is_dir())


def bonn_sequences(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*") if (p / "depth").is_dir())


def load_gt_depth(dataset: str, root: Path, seq: str, protocol: DepthProtocol) -> np.ndarray:
    """Ground-truth depth ``[T, H, W]`` of one sequence under the protocol's frame range."""
    if dataset == "sintel":
        files = sorted((root / "training" / "depth" / seq).glob("*.dpt"))
        read = read_sintel_depth
    else:
        d = root / seq
        files = [d / n for n in read_file_list(d / "depth.txt")[1]] if (d / "depth.txt").is_file() else []
        files = files or sorted((d / "depth").glob("*.png"))
        read = read_depth_png
    end = None if protocol.count is None else protocol.start + protocol.count
    files = files[protocol.start : end]
    if not files:
        raise SceneFormatError(root / seq, "depth", f"depth frames from index {protocol.start}", "none")
    return np.stack([read(f) for f in files]).astype(np.float64)


def evaluate_depth(
    dataset: str,
    gt_root: str | Path,
    pred_root: str | Path,
    align: str = "scale",
    sequences: list[str] | None = None,
    protocol: DepthProtocol | None = None,
) -> dict[str, dict[str, float]]:
    """``{seq: metrics, ..., "mean": pixel-weighted mean}`` with ``abs_rel``, ``delta1``, ``valid_pixels``."""
    gt_root, pred_root = Path(gt_root), Path(pred_root)
    protocol = protocol or PROTOCOLS[dataset]
    seqs = sequences or (sintel_sequences if dataset == "sintel" else bonn_sequences)(gt_root)
    if not seqs:
        raise SceneFormatError(
            gt_root, "<folder>", f"{dataset} sequences in the documented layout", "none found"
        )
    out = {}
    for seq in seqs:
        gt = load_gt_depth(dataset, gt_root, seq, protocol)
        pred = read_depth_prediction(pred_root, seq, gt.shape[0], gt.shape[1:])
        out[seq] = video_depth_metrics(torch.as_tensor(pred), torch.as_tensor(gt), align, protocol.max_depth)
    out["mean"] = average_sequences(list(out.values()))
    return out
