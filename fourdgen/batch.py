"""The typed batch every stage consumes: the data contract of every stage (shapes below).

A custom DataModule only has to yield :class:`GridBatch` (or a dict with the same keys, see
:meth:`GridBatch.coerce`) to plug into any stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class GridBatch:
    """A batch of B 4D clips, each a grid of V views x T timesteps of H x W frames.

    Shapes (cameras follow :mod:`fourdgen.geometry.cameras`):
        rgb:      ``[B, V, T, 3, H, W]`` float in [-1, 1]
        K:        ``[B, V, 3, 3]`` pixels
        w2c:      ``[B, V, T, 4, 4]`` OpenCV world-to-camera
        observed: ``[B, V, T]`` bool, which cells are given as conditions
        times:    ``[B, T]`` float, normalised timestamps in [0, 1] of the sampled frames
        view_ids: ``[B, V]`` long, index of each view in its scene
        time_ids: ``[B, T]`` long, index of each frame in its scene
        xyz:      ``[B, V, T, 3, H, W]`` world-space pointmaps, optional
        depth:    ``[B, V, T, 1, H, W]`` z-depth (0 = unknown), optional
        mask:     ``[B, V, T, 1, H, W]`` uint8 object ids (0 = background), optional
        text_embeds: ``[B, L, D]`` cached text-encoder states, optional
        neg_text_embeds: ``[B, L, D]`` text states of the negative prompt (CFG), optional
        image_embeds: ``[B, L, D]`` CLIP image-encoder states (Wan I2V checkpoints), optional
        rgb_latents / xyz_latents: ``[B, V, C, F, h, w]`` cached VAE latents of ``rgb`` and of the
            normalised pointmaps (:mod:`fourdgen.diffusion.latents`), optional
        cond_latents: ``[B, V, C, F, h, w']`` cached VAE latents of the conditioning component's
            condition video (:mod:`fourdgen.diffusion.conditioning`), optional
        xyz_center / xyz_scale: ``[B, V, T, 3]`` / ``[B, V]`` pointmap normalisation (to map
            generated pointmaps back), optional
        caption, scene_id: lists of B strings; vae_id: the VAE the latents come from; cond_id:
            ``"<vae_id>:<conditioning cache_key>"`` of ``cond_latents``
    """

    rgb: Tensor
    K: Tensor
    w2c: Tensor
    observed: Tensor
    times: Tensor
    view_ids: Tensor
    time_ids: Tensor
    xyz: Tensor | None = None
    depth: Tensor | None = None
    mask: Tensor | None = None
    text_embeds: Tensor | None = None
    neg_text_embeds: Tensor | None = None
    image_embeds: Tensor | None = None
    rgb_latents: Tensor | None = None
    xyz_latents: Tensor | None = None
    cond_latents: Tensor | None = None
    xyz_center: Tensor | None = None
    xyz_scale: Tensor | None = None
    caption: list[str] = field(default_factory=list)
    scene_id: list[str] = field(default_factory=list)
    vae_id: list[str] = field(default_factory=list)
    cond_id: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(B, V, T, H, W)."""
        B, V, T, _, H, W = self.rgb.shape
        return B, V, T, H, W

    def tensors(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }

    def _map(self, fn) -> GridBatch:
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.tensors().items()})

    def to(self, *args: Any, **kwargs: Any) -> GridBatch:
        """Move every tensor (Lightning calls this to transfer batches). Dtype casts apply to
        floating-point tensors only, so ids and masks keep their type."""
        dtype = kwargs.pop("dtype", None)
        rest = []
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                rest.append(a)
        out = self._map(lambda t: t.to(*rest, **kwargs))
        if dtype is None:
            return out
        return out._map(lambda t: t.to(dtype) if t.is_floating_point() else t)

    def pin_memory(self) -> GridBatch:
        return self._map(lambda t: t.pin_memory())

    def validate(self) -> GridBatch:
        """Raise ``ValueError`` naming the field whose shape or dtype breaks the contract."""
        if self.rgb.ndim != 6 or self.rgb.shape[3] != 3:
            raise ValueError(f"GridBatch.rgb: expected [B, V, T, 3, H, W], got {list(self.rgb.shape)}")
        B, V, T, H, W = self.shape
        expected = {
            "K": (B, V, 3, 3),
            "w2c": (B, V, T, 4, 4),
            "observed": (B, V, T),
            "times": (B, T),
            "view_ids": (B, V),
            "time_ids": (B, T),
            "xyz": (B, V, T, 3, H, W),
            "depth": (B, V, T, 1, H, W),
            "mask": (B, V, T, 1, H, W),
        }
        for name, shape in expected.items():
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"GridBatch.{name}: expected shape {list(shape)}, got {list(t.shape)}")
        if self.observed.dtype != torch.bool:
            raise ValueError(f"GridBatch.observed: expected dtype torch.bool, got {self.observed.dtype}")
        for name in ("text_embeds", "neg_text_embeds", "image_embeds"):
            t = getattr(self, name)
            if t is not None and (t.ndim != 3 or t.shape[0] != B):
                raise ValueError(f"GridBatch.{name}: expected [{B}, L, D], got {list(t.shape)}")
        for name in ("rgb_latents", "xyz_latents", "cond_latents"):
            t = getattr(self, name)
            if t is not None and (t.ndim != 6 or tuple(t.shape[:2]) != (B, V)):
                raise ValueError(f"GridBatch.{name}: expected [{B}, {V}, C, F, h, w], got {list(t.shape)}")
        if self.xyz_center is not None and tuple(self.xyz_center.shape) != (B, V, T, 3):
            raise ValueError(
                f"GridBatch.xyz_center: expected {[B, V, T, 3]}, got {list(self.xyz_center.shape)}"
            )
        if self.xyz_scale is not None and tuple(self.xyz_scale.shape) != (B, V):
            raise ValueError(f"GridBatch.xyz_scale: expected {[B, V]}, got {list(self.xyz_scale.shape)}")
        for name in ("caption", "scene_id", "vae_id", "cond_id"):
            if getattr(self, name) and len(getattr(self, name)) != B:
                raise ValueError(f"GridBatch.{name}: expected {B} strings, got {len(getattr(self, name))}")
        return self

    @classmethod
    def collate(cls, samples: list[GridBatch]) -> GridBatch:
        """Concatenate samples along B (a DataLoader ``collate_fn``). Optional fields must be
        present in all samples or in none."""
        first = samples[0]
        out = {}
        for f in dataclasses.fields(cls):
            vals = [getattr(s, f.name) for s in samples]
            if isinstance(vals[0], Tensor):
                if any(v is None for v in vals):
                    raise ValueError(f"GridBatch.collate: field '{f.name}' missing in some samples")
                out[f.name] = torch.cat(vals)
            elif isinstance(vals[0], list):
                out[f.name] = [x for v in vals for x in v]
            else:
                out[f.name] = getattr(first, f.name)
        return cls(**out).validate()

    @classmethod
    def coerce(cls, batch: GridBatch | dict[str, Any]) -> GridBatch:
        """Accept a :class:`GridBatch` or a dict with its field names (missing ids get defaults)."""
        if isinstance(batch, GridBatch):
            return batch.validate()
        if not isinstance(batch, dict):
            raise TypeError(f"expected a GridBatch or a dict of its fields, got {type(batch).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(batch) - names
        if unknown:
            raise ValueError(f"GridBatch: unknown fields {sorted(unknown)}; known: {sorted(names)}")
        missing = [k for k in ("rgb", "K", "w2c") if batch.get(k) is None]
        if missing:
            raise ValueError(
                f"GridBatch: required fields {missing} are missing (rgb, K and w2c are required)"
            )
        b = dict(batch)
        rgb = b["rgb"]
        if not isinstance(rgb, Tensor) or rgb.ndim != 6:
            shape = list(rgb.shape) if isinstance(rgb, Tensor) else type(rgb).__name__
            raise ValueError(f"GridBatch.rgb: expected a [B, V, T, 3, H, W] tensor, got {shape}")
        B, V, T = rgb.shape[:3]
        b.setdefault("observed", torch.zeros(B, V, T, dtype=torch.bool, device=rgb.device))
        b.setdefault(
            "times",
            torch.linspace(0, 1, T, device=rgb.device).expand(B, T)
            if T > 1
            else torch.zeros(B, T, device=rgb.device),
        )
        b.setdefault("view_ids", torch.arange(V, device=rgb.device).expand(B, V))
        b.setdefault("time_ids", torch.arange(T, device=rgb.device).expand(B, T))
        return cls(**b).validate()
