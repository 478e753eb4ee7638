"""Novel views: N3DV's held-out camera (PSNR / SSIM / LPIPS per frame, averaged) and DyCheck's
masked metrics on co-visible pixels (mPSNR / mSSIM / mLPIPS per validation frame, averaged).

- N3DV: the ground truth is an imported scene (``fourdgen import n3dv``) and its view ``cam00``;
  the prediction a folder of frames or an mp4 of the same length and size.
- DyCheck: the ground truth is the capture itself (``splits/val.json``, ``rgb/<s>x/``,
  ``covisible/<s>x/val/``); the prediction ``<pred>/<frame_name>.png`` per validation frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fourdgen.data.scene import SceneFormatError, read_scene
from fourdgen.evaluation.predictions import read_frames
from fourdgen.importers.common import read_image
from fourdgen.importers.dycheck import read_split
from fourdgen.metrics.image import LPIPS, psnr, ssim
from fourdgen.metrics.masked import MaskedLPIPS, masked_psnr, masked_ssim


def _chw(a: np.ndarray) -> Tensor:
    return torch.as_tensor(a).permute(*range(a.ndim - 3), -1, -3, -2).float() / 255.0


def _check_size(path: Path, got: tuple, want: tuple) -> None:
    if got != want:
        raise SceneFormatError(
            path, "<size>", f"frames of {want[1]}x{want[0]} like the ground truth", f"{got[1]}x{got[0]}"
        )


def evaluate_n3dv(
    scene: str | Path,
    pred: str | Path,
    view: str = "cam00",
    lpips_weights: str | None = None,
    allow_random_lpips: bool = False,
) -> dict[str, float]:
    """``{"psnr", "ssim", "lpips"}`` (LPIPS only with weights or ``allow_random_lpips``)."""
    s = read_scene(scene)
    names = [v.name for v in s.views]
    if view not in names:
        raise SceneFormatError(s.root / "scene.json", "views[].name", f"a view named {view}", names)
    gt = s.load_rgb(names.index(view))  # [T, 3, H, W]
    frames = read_frames(Path(pred), s.num_frames)
    _check_size(Path(pred), frames.shape[1:3], (s.height, s.width))
    p = _chw(frames)
    out = {"psnr": float(psnr(p, gt)), "ssim": float(ssim(p, gt))}
    if lpips_weights or allow_random_lpips:
        metric = LPIPS("alex", lpips_weights, allow_random_backbone=allow_random_lpips)
        out["lpips"] = float(
            torch.cat([metric.score(p[i : i + 8], gt[i : i + 8]) for i in range(0, len(p), 8)]).mean()
        )
    return out


def evaluate_dycheck(
    root: str | Path,
    pred: str | Path,
    scale: int = 1,
    split: str = "val",
    lpips_weights: str | None = None,
    allow_random_lpips: bool = False,
) -> dict[str, float]:
    """``{"mpsnr", "mssim", "mlpips", "frames"}`` over the split's frames (the whole image where a
    frame has no covisibility mask)."""
    root, pred = Path(root), Path(pred)
    frames = read_split(root / "splits" / f"{split}.json")
    if not frames:
        raise SceneFormatError(root / "splits" / f"{split}.json", "frame_names", "at least one frame", "none")
    lp = (
        MaskedLPIPS("alex", lpips_weights, allow_random_lpips)
        if (lpips_weights or allow_random_lpips)
        else None
    )
    rows = []
    for name, _, _ in frames:
        gt = read_image(root / "rgb" / f"{scale}x" / f"{name}.png", root / "splits" / f"{split}.json", name)
        out = read_image(pred / f"{name}.png", pred, f"{name}.png")
        _check_size(pred / f"{name}.png", out.shape[:2], gt.shape[:2])
        cov_file = root / "covisible" / f"{scale}x" / split / f"{name}.png"
        mask = (
            torch.as_tensor(read_image(cov_file, cov_file, "<mask>")[..., 0] > 127)
            if cov_file.is_file()
            else None
        )
        g, p = _chw(gt), _chw(out)
        row = [float(masked_psnr(p, g, mask)), float(masked_ssim(p, g, mask))]
        rows.append(row + ([float(lp(p, g, mask))] if lp else []))
    means = np.mean(np.array(rows), axis=0)
    res = {"mpsnr": float(means[0]), "mssim": float(means[1]), "frames": len(rows)}
    if lp:
        res["mlpips"] = float(means[2])
    return res
