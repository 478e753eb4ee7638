"""Where Full-4D's projection conditioning gets the source video's depth: a recipe picks one.

- :class:`BatchDepth`: the scene's depth files (``GridBatch.depth``), the default for training on
  scenes with ground truth (defined beside the coupling that uses it, re-exported here).
- :class:`PredictedDepth`: depth recovered by stage 1a (``depth.npz`` written next to each clip by
  :class:`~fourdgen.callbacks.pointmaps.PointmapVideoWriter`), for inputs without depth. Its units
  are the clip's pointmap units: the target cameras must use the same scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fourdgen.batch import GridBatch
from fourdgen.nn.grid_coupling import BatchDepth, DepthProvider

__all__ = ["BatchDepth", "DepthProvider", "PredictedDepth"]


class PredictedDepth(DepthProvider):
    """Stage-1a depth: ``<root>/<scene_id>/depth.npz`` (key ``depth``, ``[T', h, w]``), the clip's
    first ``T`` frames resized (nearest) to the batch's ``H x W``."""

    def __init__(self, root: str):
        self.root = Path(root)

    def load(self, scene_id: str, T: int, H: int, W: int) -> Tensor:
        path = self.root / scene_id / "depth.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no stage-1a depth for scene {scene_id!r} (PredictedDepth.root)")
        with np.load(path) as f:
            if "depth" not in f:
                raise ValueError(f"{path}: field 'depth' missing (expected [T, H, W] float)")
            d = torch.from_numpy(f["depth"]).float()
        if d.ndim != 3 or d.shape[0] < T:
            raise ValueError(f"{path}: field 'depth' must be [T >= {T}, H, W], got {list(d.shape)}")
        return F.interpolate(d[:T, None], size=(H, W), mode="nearest-exact")[:, 0]

    def __call__(self, b: GridBatch, view: int) -> Tensor:
        B, _, T, H, W = b.shape
        if len(b.scene_id) != B:
            raise ValueError("PredictedDepth: GridBatch.scene_id must name every clip")
        return torch.stack([self.load(s, T, H, W) for s in b.scene_id]).to(b.rgb.device)
