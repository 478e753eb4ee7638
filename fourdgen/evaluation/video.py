"""Video metrics of generated videos (Full-4D table 1): FVD against real videos (I3D), CLIP-F of
each generated video, CLIP-V between input and generated videos paired by name. Videos are the
``.mp4`` files or frame folders of a folder; the networks are local files (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fourdgen.data.scene import SceneFormatError
from fourdgen.evaluation.predictions import read_frames
from fourdgen.metrics.clip_video import CLIPEmbedder, clip_f, clip_v
from fourdgen.metrics.fvd import VideoFeatures, fvd


def read_videos(folder: Path) -> dict[str, torch.Tensor]:
    """``{name: [T, 3, H, W] in [0, 1]}`` of the mp4 files and frame folders in ``folder``."""
    items = (
        sorted(p for p in folder.iterdir() if p.is_dir() or p.suffix.lower() == ".mp4")
        if folder.is_dir()
        else []
    )
    if not items:
        raise SceneFormatError(folder, "<folder>", "videos (.mp4 files or frame folders)", "none found")
    return {p.stem: torch.as_tensor(read_frames(p)).permute(0, 3, 1, 2).float() / 255.0 for p in items}


def evaluate_video(
    fake: str | Path,
    real: str | Path | None = None,
    i3d: str | None = None,
    clip: str | None = None,
    inputs: str | Path | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """``{"fvd"}`` with ``real`` and ``i3d``; ``{"clip_f"}`` with ``clip``; ``{"clip_v"}`` with
    ``clip`` and ``inputs``."""
    gen = read_videos(Path(fake))
    out: dict[str, float] = {"videos": len(gen)}
    if real is not None and i3d is not None:
        ref = read_videos(Path(real))
        out["fvd"] = fvd(
            torch.stack(list(ref.values())),
            torch.stack(list(gen.values())),
            VideoFeatures(i3d, device=device),
        )
    if clip is not None:
        embed = CLIPEmbedder(clip, device=device)
        out["clip_f"] = float(np.mean([clip_f(v, embed) for v in gen.values()]))
        if inputs is not None:
            src = read_videos(Path(inputs))
            missing = sorted(set(gen) - set(src))
            if missing:
                raise SceneFormatError(
                    Path(inputs), missing[0], "an input video of each generated one's name", "missing"
                )
            out["clip_v"] = float(np.mean([clip_v(src[k], v, embed) for k, v in gen.items()]))
    return out
