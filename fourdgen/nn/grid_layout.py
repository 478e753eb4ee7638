"""Token layout of a multi-view video grid inside a Wan DiT: the one place the order is defined.

A grid holds V views x F latent frames x (h x w) patch tokens. The DiT sees the per-view latent
videos concatenated along frames, ``[B, C, V * F, h * p, w * p]``, so Wan's patch embedding (which
never mixes frames: temporal patch 1) yields tokens in the order

    token n = ((v * F + f) * h + i) * w + j      (view, frame, patch row, patch column)

Frames ``f < target_frames`` of each view are generated; frames ``f >= target_frames`` are
condition frames (Full-4D concatenates each view's projected-condition latents after its target
latents; 4Real-Video-V2 has none); view ``source_view`` is the input video's row, whose condition
frames every generated token may attend to (Full-4D's ``cross_half`` mask term). Wan's 3-D RoPE
gets frame position ``v * t_max + f`` (both papers): view and time collapse into one long "video",
so the pretrained positional code is reused unchanged. ``t_max`` is the longest latent clip the base
model was trained on (21 for Wan's 81 frames); views then never share positions as long as
``F <= t_max``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor


@dataclass(frozen=True)
class GridLayout:
    """V views x F latent frames x (h x w) tokens (sizes after patchify).

    Args:
        views / frames / height / width: V, F (per view, condition frames included), h, w.
        t_max: RoPE frame stride between views (None: ``frames``, i.e. views laid end to end).
        target_frames: generated frames per view (None: all ``frames``).
        source_view: the input video's row (Full-4D); part of the layout so that the masks built
            from it, and their cache keys, follow it.
    """

    views: int
    frames: int
    height: int
    width: int
    t_max: int | None = None
    target_frames: int | None = None
    source_view: int = 0

    def __post_init__(self):
        if min(self.views, self.frames, self.height, self.width) < 1:
            raise ValueError(f"GridLayout: sizes must be positive, got {self}")
        if self.t_max is not None and self.t_max < self.frames:
            raise ValueError(
                f"GridLayout: t_max={self.t_max} < frames={self.frames}: views would share RoPE positions"
            )
        if self.target_frames is not None and not 0 < self.target_frames <= self.frames:
            raise ValueError(
                f"GridLayout: target_frames must be in [1, {self.frames}], got {self.target_frames}"
            )
        if not 0 <= self.source_view < self.views:
            raise ValueError(f"GridLayout: source_view must be in [0, {self.views}), got {self.source_view}")

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width

    @property
    def num_frames(self) -> int:
        """V * F frames in the sequence."""
        return self.views * self.frames

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.frame_tokens

    @property
    def stride(self) -> int:
        return self.frames if self.t_max is None else self.t_max

    @property
    def targets(self) -> int:
        return self.frames if self.target_frames is None else self.target_frames

    def frame_view_time(self, device=None) -> tuple[Tensor, Tensor]:
        """View and frame index ``[V * F]`` (long) of every frame of the sequence."""
        n = torch.arange(self.num_frames, device=device)
        return n // self.frames, n % self.frames

    def position_ids(self, device=None) -> Tensor:
        """``[N, 3]`` RoPE ids (frame ``v * t_max + f``, row, column) in token order."""
        v, f = self.frame_view_time(device)
        t = (v * self.stride + f)[:, None, None].expand(-1, self.height, self.width)
        i, j = torch.meshgrid(
            torch.arange(self.height, device=device), torch.arange(self.width, device=device), indexing="ij"
        )
        ids = torch.stack([t, i.expand_as(t), j.expand_as(t)], dim=-1)
        return ids.reshape(-1, 3)


def grid_to_sequence(latents: Tensor) -> Tensor:
    """Per-view latent videos ``[B, V, C, F, h, w]`` -> the DiT input ``[B, C, V * F, h, w]``."""
    return rearrange(latents, "b v c f h w -> b c (v f) h w")


def sequence_to_grid(x: Tensor, views: int) -> Tensor:
    """Inverse of :func:`grid_to_sequence`."""
    return rearrange(x, "b c (v f) h w -> b v c f h w", v=views)
