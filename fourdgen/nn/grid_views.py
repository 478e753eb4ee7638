"""A multi-view grid batch's views and cells: view orders, and which cells are given.

:class:`~fourdgen.nn.grid_coupling.GridCoupling` subclasses reorder a training batch's views
(Full-4D: a random target order per clip; 4Real-Video-V2: reversed at random) and turn the batch's
``observed [B, V, T]`` pixel cells into the latent cells that are given (reference cells).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from fourdgen.batch import GridBatch

# GridBatch fields indexed by view at dim 1 (ids and latent caches included): what a view permutation
# moves. Listed, not inferred from shapes: times [B, T] looks per-view whenever T == V.
PER_VIEW_FIELDS = (
    "rgb",
    "K",
    "w2c",
    "observed",
    "view_ids",
    "xyz",
    "depth",
    "mask",
    "rgb_latents",
    "xyz_latents",
    "cond_latents",
    "xyz_center",
    "xyz_scale",
)


def permute_views(b: GridBatch, perm: Tensor) -> GridBatch:
    """The batch with clip ``i``'s row ``v`` taken from its view ``perm[i, v]`` (``perm [B, V]`` long):
    every per-view field (:data:`PER_VIEW_FIELDS`) moves, so each view keeps its own cameras and
    depth; scene-wide fields (times, text, captions) stay."""
    B, V = b.shape[:2]
    if tuple(perm.shape) != (B, V):
        raise ValueError(f"permute_views: perm must be [{B}, {V}], got {list(perm.shape)}")
    perm = perm.to(b.rgb.device)
    rows = torch.arange(B, device=perm.device)[:, None]
    moved = {f: getattr(b, f)[rows, perm] for f in PER_VIEW_FIELDS if getattr(b, f) is not None}
    return dataclasses.replace(b, **moved)


def random_view_order(B: int, V: int, generators: list[torch.Generator] | None = None) -> Tensor:
    """``[B, V]`` long: an independent uniform permutation per clip, clip ``i`` drawn from
    ``generators[i]`` (the stage's per-sample generators, :func:`~fourdgen.stages.common.sample_generators`,
    so DDP ranks and resumed runs repeat), or from torch's global CPU RNG without them."""
    gens = per_clip(generators, B)
    return (
        torch.stack([torch.randperm(V, generator=g) for g in gens])
        if B
        else torch.zeros(0, V, dtype=torch.long)
    )


def per_clip(generators: list[torch.Generator] | None, B: int) -> list[torch.Generator | None]:
    """One generator per clip (``None`` each without them: torch's global RNG)."""
    if generators is None:
        return [None] * B
    if len(generators) != B:
        raise ValueError(f"expected one generator per clip ({B}), got {len(generators)}")
    return list(generators)


def reversal_order(flip: Tensor, views: int) -> Tensor:
    """``[B, V]`` long: views in reverse order for the clips where ``flip [B]`` (bool) is set, in
    their order elsewhere (a :func:`permute_views` argument)."""
    ident = torch.arange(views, device=flip.device).expand(flip.shape[0], views)
    return torch.where(flip[:, None], ident.flip(1), ident)


def has_both_references(observed: Tensor) -> Tensor:
    """``[B]`` bool: clips of ``observed [B, V, T]`` given a whole fixed-view row and a whole
    freeze-time column (4Real-Video-V2's two reference videos; needs V, T > 1)."""
    _, V, T = observed.shape
    both = observed.all(2).any(1) & observed.all(1).any(1)
    return both & (V > 1) & (T > 1)


def latent_frames_observed(observed: Tensor, t_factor: int) -> Tensor:
    """Pixel cells ``[B, V, T]`` -> latent frames ``[B, V, F]`` bool: Wan's causal VAE puts pixel frame
    0 alone in latent frame 0 and frames ``t(k-1)+1 .. tk`` in frame k; a latent frame counts as
    observed when all its pixel frames are."""
    first, rest = observed[..., :1], observed[..., 1:]
    if rest.shape[-1] % t_factor:
        raise ValueError(f"clip of {observed.shape[-1]} frames: expected 1 + {t_factor} k frames")
    rest = rest.unflatten(-1, (-1, t_factor)).all(-1)
    return torch.cat([first, rest], dim=-1)


def cells(m: Tensor) -> Tensor:
    """``[B, V, F]`` -> ``[B, 1, V F, 1, 1]``."""
    return m.flatten(1)[:, None, :, None, None]
