"""Frames in the form viser's browser renderer takes, and the subsets ``--max-gaussians`` keeps."""

from __future__ import annotations

import numpy as np
import torch
from einops import einsum
from torch import Tensor

from fourdgen.gaussians.container import Gaussians
from fourdgen.geometry.rotations import quaternion_to_matrix


def top_opacity(g: Gaussians, k: int | None) -> Gaussians:
    """The ``k`` most opaque of ``g`` (all if ``k`` is None or >= N), in their original order;
    ties go to the lower index, so the subset is the same on every call."""
    if k is None or len(g) <= k:
        return g
    order = torch.argsort(g.opacity_logits.detach(), descending=True, stable=True)[:k]
    return g.index(order.sort().values)


def even_subset(n: int, k: int | None) -> Tensor | slice:
    """Indices of ``k`` of ``n`` points spread evenly over their order (a slice of all if ``k >= n``)."""
    if k is None or n <= k:
        return slice(None)
    return torch.linspace(0, n - 1, k).round().long()


def viser_splats(g: Gaussians) -> dict[str, np.ndarray]:
    """``g`` as :meth:`viser.SceneApi.add_gaussian_splats` arguments: ``centers [N, 3]``,
    ``covariances [N, 3, 3]`` (R S S^T R^T), ``rgbs [N, 3]`` and ``opacities [N, 1]`` in [0, 1].

    Colours are the view-independent DC term: viser's splats have no spherical harmonics."""
    g = g.detach().to("cpu", torch.float32)
    R = quaternion_to_matrix(g.quats)
    RS = R * g.scales[:, None, :]
    cov = einsum(RS, RS, "n i k, n j k -> n i j")
    return {
        "centers": g.means.numpy(),
        "covariances": cov.numpy(),
        "rgbs": g.rgb.numpy(),
        "opacities": g.opacities[:, None].numpy(),
    }
