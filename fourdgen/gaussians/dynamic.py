"""Dynamic Gaussians at one time: canonical splats moved by a deformation field and faded in time.

The fitter's scene (:class:`~fourdgen.stages.fit.Gaussian4DFitter`) is canonical Gaussians in
gsplat-trainer form (:data:`~.initialization.SPLAT_KEYS`: means, log-scales, quaternions, opacity
logits, SH), optionally with a temporal centre and width (:mod:`.temporal`) and static flags
(:data:`~.initialization.STATIC_KEY`). At time ``t`` the field's offsets are added to the moving
Gaussians (4DGaussians adds them to all; with the static/moving split only the moving ones are
deformed, 3D-4DGS / Swift4D) and the opacities fade around each Gaussian's own time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

from fourdgen.gaussians.deformation import Deformation
from fourdgen.gaussians.initialization import SPLAT_KEYS, STATIC_KEY
from fourdgen.gaussians.temporal import faded_logits

Field = Callable[[Tensor, Tensor | float], Deformation]


def offsets(field: Field, means: Tensor, t: Tensor | float, own_t: Tensor | None = None) -> Deformation:
    """The field's offsets of Gaussians ``means [M, 3]`` at time ``t``; with ``own_t [M]`` (each
    Gaussian's own time), relative ones: minus the field's offsets at ``own_t``, so that a Gaussian
    sits where its point was at its own time and the field carries it from there."""
    d = field(means, t)
    if own_t is None:
        return d
    d0 = field(means, own_t)
    return Deformation(d.d_means - d0.d_means, d.d_log_scales - d0.d_log_scales, d.d_quats - d0.d_quats)


def gaussians_at(
    splats: Mapping[str, Tensor],
    t: Tensor | float,
    field: Field | None = None,
    moving: Tensor | None = None,
    relative: bool = False,
) -> dict[str, Tensor]:
    """The Gaussians (:data:`SPLAT_KEYS`, ``[N, ...]``) at normalised time ``t``.

    Args:
        splats: canonical tensors by key, with ``t_mean``/``t_scale`` ``[N]`` for temporal opacity
            and :data:`STATIC_KEY` ``[N]`` (1 = static) for the split.
        field: the deformation field (None: not deformed, e.g. the coarse stage).
        moving: indices ``[M]`` of the Gaussians that are not static (with :data:`STATIC_KEY` in
            ``splats``; the caller caches them, a ``nonzero`` is a host sync). Only they are
            deformed.
        relative: offsets counted from each Gaussian's own time (needs ``t_mean``).
    """
    out = {k: splats[k] for k in SPLAT_KEYS}
    static = splats[STATIC_KEY] > 0.5 if STATIC_KEY in splats else None
    own = splats["t_mean"] if relative and "t_mean" in splats else None
    if field is not None:
        if static is None:
            d = offsets(field, splats["means"], t, own)
            out.update(
                means=splats["means"] + d.d_means,
                scales=splats["scales"] + d.d_log_scales,
                quats=splats["quats"] + d.d_quats,
            )
        else:  # only the moving Gaussians: the field's cost and capacity go to them
            if moving is None:
                raise ValueError("gaussians_at: splats with static flags need the moving Gaussians' indices")
            d = offsets(field, splats["means"][moving], t, None if own is None else own[moving])
            out.update(
                means=splats["means"].index_add(0, moving, d.d_means),
                scales=splats["scales"].index_add(0, moving, d.d_log_scales),
                quats=splats["quats"].index_add(0, moving, d.d_quats),
            )
    if "t_mean" in splats:
        fade = splats["t_mean"], splats["t_scale"]
        out["opacities"] = faded_logits(splats["opacities"], t, *fade, always=static)
    return out
