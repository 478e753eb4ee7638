"""CLIP-F and CLIP-V (Full-4D, section 4): CLIP image-embedding similarity within and across videos.

- CLIP-F: cosine similarity of the CLIP embeddings of adjacent frames of a video, averaged over
  the ``T - 1`` pairs (temporal coherence).
- CLIP-V: cosine similarity between corresponding frames (same timestamp) of an input and an
  output video, averaged over frames (view synchronisation).

Embeddings are ``image_embeds`` of a transformers ``CLIPVisionModelWithProjection`` and its
``CLIPImageProcessor``, loaded from a local folder (``local_files_only``; nothing is downloaded).
Values are cosines in [-1, 1] (papers often print them x 100).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fourdgen.errors import ConfigError


class CLIPEmbedder:
    """Unit CLIP image embeddings ``[N, D]`` of frames ``[N, 3, H, W]`` in [0, 1]."""

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 32):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"CLIP weights: expected a local transformers folder with config.json, got {path}"
            )
        self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = (
            CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).to(device).eval()
        )
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, frames: Tensor) -> Tensor:
        out = []
        for i in range(0, frames.shape[0], self.batch_size):
            chunk = (frames[i : i + self.batch_size].clamp(0, 1) * 255).round().byte()
            images = list(chunk.permute(0, 2, 3, 1).cpu().numpy())
            pix = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self.model(pixel_values=pix).image_embeds.float().cpu())
        return F.normalize(torch.cat(out), dim=-1)


def clip_f(video: Tensor, embed: CLIPEmbedder) -> float:
    """CLIP-F of one video ``[T, 3, H, W]`` (T >= 2)."""
    if video.shape[0] < 2:
        raise ValueError(f"CLIP-F needs at least 2 frames, got {video.shape[0]}")
    e = embed(video)
    return float((e[:-1] * e[1:]).sum(-1).mean())


def clip_v(inputs: Tensor, outputs: Tensor, embed: CLIPEmbedder) -> float:
    """CLIP-V of two videos ``[T, 3, H, W]``: corresponding frames' mean cosine similarity."""
    if inputs.shape[0] != outputs.shape[0]:
        raise ValueError(f"CLIP-V needs videos of one length, got {inputs.shape[0]} and {outputs.shape[0]}")
    return float((embed(inputs) * embed(outputs)).sum(-1).mean())
