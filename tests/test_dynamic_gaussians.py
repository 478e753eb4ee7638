"""fourdgen.gaussians.dynamic: canonical Gaussians deformed and faded at one time."""

from __future__ import annotations

import pytest
import torch

from fourdgen.gaussians.deformation import Deformation
from fourdgen.gaussians.dynamic import gaussians_at
from fourdgen.gaussians.temporal import faded_logits


def _splats(n=5, static=None, temporal=False):
    g = torch.Generator().manual_seed(0)
    s = {
        "means": torch.randn(n, 3, generator=g),
        "scales": torch.randn(n, 3, generator=g),
        "quats": torch.randn(n, 4, generator=g),
        "opacities": torch.randn(n, generator=g),
        "sh0": torch.rand(n, 1, 3, generator=g),
        "shN": torch.zeros(n, 0, 3),
    }
    if temporal:
        s["t_mean"] = torch.rand(n, generator=g)
        s["t_scale"] = torch.full((n,), -1.0)
    if static is not None:
        s["static"] = torch.tensor(static, dtype=torch.float32)
    return s


def _field(means, t):  # offsets that depend on the point and the time
    t = torch.as_tensor(t, dtype=means.dtype)
    t = t[:, None] if t.dim() else t
    return Deformation(means * t, 0.5 * means * t, torch.cat([means, means[:, :1]], 1) * t)


def test_only_the_moving_gaussians_are_deformed_and_faded():
    static = [1, 0, 1, 0, 0]
    s = _splats(static=static, temporal=True)
    moving = torch.tensor([1, 3, 4])
    out = gaussians_at(s, 0.6, _field, moving)
    still = torch.tensor(static, dtype=torch.bool)
    torch.testing.assert_close(out["means"][still], s["means"][still])
    torch.testing.assert_close(out["means"][~still], s["means"][~still] * 1.6)
    torch.testing.assert_close(out["scales"][~still], s["scales"][~still] + 0.5 * s["means"][~still] * 0.6)
    torch.testing.assert_close(out["opacities"][still], s["opacities"][still])
    fade = faded_logits(s["opacities"], 0.6, s["t_mean"], s["t_scale"])
    torch.testing.assert_close(out["opacities"][~still], fade[~still])
    # without the field (the coarse stage) nothing moves, the fade stays
    plain = gaussians_at(s, 0.6)
    torch.testing.assert_close(plain["means"], s["means"])
    torch.testing.assert_close(plain["opacities"], out["opacities"])
    with pytest.raises(ValueError, match="moving"):
        gaussians_at(s, 0.6, _field)


def test_relative_offsets_count_from_each_gaussians_own_time():
    s = _splats(temporal=True)
    out = gaussians_at(s, 0.6, _field, relative=True)
    torch.testing.assert_close(out["means"], s["means"] * (1 + 0.6 - s["t_mean"][:, None]))
    # at its own time a Gaussian sits at its canonical place
    own = gaussians_at(s, s["t_mean"][:1].expand(5), _field, relative=True)
    torch.testing.assert_close(own["means"][0], s["means"][0])
