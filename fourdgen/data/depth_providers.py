"""Where Full-4D's projection conditioning gets the source video's depth: a recipe picks one.

- :class:`BatchDepth`: the scene's depth files (``GridBatch.depth``), the default for training on
  scenes with ground truth (defined beside the coupling that uses it, re-exported here).
- :class:`PredictedDepth`: depth recovered by stage 1a (``depth.npz`` written next to each clip by
  :class:`~fourdgen.callbacks.pointmaps.PointmapVideoWriter`), for inputs without depth. Its units
  are the clip's pointmap units: the target cameras must use the same scale.
- :class:`MonocularDepth`: a monocular depth model (Depth Anything V2, :mod:`fourdgen.backbones.depth`)
  run on the source view, aligned to the batch's depth where it has some, else scaled to the rig.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fourdgen.batch import GridBatch
from fourdgen.errors import ConfigError
from fourdgen.geometry.align import align_depth
from fourdgen.geometry.cameras import camera_centers, focus_point
from fourdgen.nn.grid_coupling import BatchDepth, DepthProvider

__all__ = ["BatchDepth", "DepthProvider", "MonocularDepth", "PredictedDepth"]


class PredictedDepth(DepthProvider):
    """Stage-1a depth: ``<root>/<scene_id>/depth.npz`` (key ``depth``, ``[T', h, w]``), the clip's
    first ``T`` frames resized (nearest) to the batch's ``H x W``."""

    def __init__(self, root: str):
        self.root = Path(root)

    def batch_needs(self) -> list[tuple[tuple[str, ...], str]]:
        return [
            (("scene_id",), f"the clip names its depth file <root>/<scene_id>/depth.npz (root {self.root})")
        ]

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


class MonocularDepth(DepthProvider):
    """Depth of a view predicted by a local depth-estimation checkpoint, in the scene's scale.

    The model (:class:`~fourdgen.backbones.depth.DepthEstimator`, built on first use on the batch's
    device) sees the view's frames; its prediction is then put in scene units per clip:

    - where ``GridBatch.depth`` has valid (> 0) pixels in that view: least-squares fit to them
      (:func:`~fourdgen.geometry.align.align_depth` with ``mode``, one fit over the clip's frames);
    - otherwise: one scale so that the clip's median depth equals the median over frames of the
      distance from the view's camera centre to the rig's focus point
      (:func:`~fourdgen.geometry.cameras.focus_point` of all the clip's cameras). A disparity
      output is first inverted with shift 0: without a reference the shift is unknowable, and 0 is
      the one that keeps the prediction's depth ordering and ratios as the model gave them.

    Args:
        path: checkpoint folder (see :class:`~fourdgen.backbones.depth.DepthEstimator`).
        mode: ``"scale_shift"`` or ``"scale"`` for the fit to reference depth.
        dtype: model weights' dtype, ``"float32"`` or ``"bfloat16"``.
        batch_size: frames per forward pass.
    """

    def __init__(self, path: str, mode: str = "scale_shift", dtype: str = "float32", batch_size: int = 8):
        if mode not in ("scale_shift", "scale"):
            raise ConfigError(f"MonocularDepth.mode: expected 'scale_shift' or 'scale', got {mode!r}")
        self.path, self.mode, self.dtype, self.batch_size = str(path), mode, dtype, int(batch_size)
        self._estimator = None

    def estimator(self, device: torch.device | str):
        """The :class:`~fourdgen.backbones.depth.DepthEstimator`, loaded once, on ``device``."""
        from fourdgen.backbones.depth import DepthEstimator

        if self._estimator is None:
            self._estimator = DepthEstimator(self.path, str(device), self.dtype, self.batch_size)
        elif self._estimator.device != torch.device(device):
            self._estimator.to(device)
        return self._estimator

    @staticmethod
    def scale_to_rig(pred: Tensor, space: str, w2c: Tensor, view: int) -> Tensor:
        """``pred [T, H, W]`` -> depth with median = camera-to-focus distance of ``view`` in the clip's
        rig ``w2c [V, T, 4, 4]`` (disparity inverted with shift 0; 0 = unknown)."""
        depth = torch.where(pred > 0, 1.0 / pred, 0.0) if space == "disparity" else pred.clamp_min(0.0)
        valid = (depth > 0) & torch.isfinite(depth)
        if not valid.any():
            raise ValueError(f"MonocularDepth: view {view}: the prediction has no positive values to scale")
        focus = focus_point(w2c).to(w2c)
        target = (camera_centers(w2c[view]) - focus).norm(dim=-1).median()
        return torch.where(valid, depth * (target / depth[valid].median()), 0.0)

    @torch.no_grad()
    def __call__(self, b: GridBatch, view: int) -> Tensor:
        B, _, T, H, W = b.shape
        est = self.estimator(b.rgb.device)
        need = 2 if self.mode == "scale_shift" else 1
        out = []
        for i in range(B):
            pred = est(((b.rgb[i, view].float() + 1) / 2).clamp(0, 1))  # [T, H, W]
            ref = None if b.depth is None else b.depth[i, view, :, 0].float()
            if ref is not None and int((ref > 0).sum()) >= need:
                out.append(align_depth(pred, ref, ref > 0, est.space, self.mode))
            else:
                out.append(self.scale_to_rig(pred, est.space, b.w2c[i].float(), view))
        return torch.stack(out)
