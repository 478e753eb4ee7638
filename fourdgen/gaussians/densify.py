"""Densification and pruning with a hard budget on the number of Gaussians.

gsplat's ``DefaultStrategy`` (3DGS rules: duplicate small / split large Gaussians with high
screen-space gradient, prune transparent or huge ones) has no cap on the count. Full-4D (and
4DGaussians, whose knobs these are) grows only while the count is below ``max_gaussians``
(120,000) and prunes only while it is above ``prune_to`` (80,000), with opacity threshold 0.015.
This subclass adds exactly that; the gradient statistics and the parameter/optimizer surgery
stay gsplat's.

Budget rules (our reading of Full-4D appendix B, stated here because the paper is brief):
- Growth never makes the count exceed ``max_gaussians``: when there are more candidates than
  room, the ones with the largest mean screen-space gradient win.
- Pruning (opacity < ``prune_opa``, or too large) runs only while the count is above ``prune_to``.

3DGS (and gsplat, 4DGaussians) also prunes Gaussians larger than ``prune_scale3d`` x the cameras'
extent once a step passes ``reset_every``. That limit is in world units, so it deletes a far
background's Gaussians (a sky dome 3x the rig's radius away needs them about that much larger for the
same pixels), and under a budget they do not regrow: on a six-camera CPU fit with one reset the
dome fell from 29 to 11 dB (benchmarks/RESULTS.md, issue 17 eighth pass). ``prune_scale3d_by_distance``
scales the limit by the Gaussian's distance from the cameras' centre beyond their extent, so it
bounds the angular size instead; inside the rig it is 3DGS's rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from gsplat.strategy import DefaultStrategy
from gsplat.strategy.ops import duplicate, remove, reset_opa, split


@dataclass
class BudgetStrategy(DefaultStrategy):
    max_gaussians: int = 120_000
    prune_to: int = 80_000
    prune_opa: float = 0.015
    prune_scale3d_by_distance: bool = False

    def accumulate(self, params, state: dict[str, Any], info: dict[str, Any], packed: bool = False) -> None:
        """Add one render's screen-space gradient statistics to ``state`` without refining.

        For steps that render several times: every render but the last goes through this after
        the backward pass, the last through :meth:`step_post_backward` (which adds its own
        statistics, then grows/prunes). ``info``: the render's ``RenderOutput.info`` (gsplat's meta,
        ``means2d [C, N, 2]`` holding its gradient); ``state`` (from ``initialize_state``) sums
        ``grad2d [N]`` and ``count [N]`` and keeps the largest screen-space ``radii [N]``.
        """
        self._update_state(params, state, info, packed=packed)

    @torch.no_grad()
    def _update_state(self, params, state: dict[str, Any], info: dict[str, Any], packed: bool = False):
        """gsplat's running statistics, dense: for each Gaussian the sum over cameras that see it of
        its screen-space gradient norm (``grad2d``), their number (``count``) and its largest radius
        (``radii``, normalised by the image size). gsplat gathers the visible (camera, Gaussian)
        pairs with ``torch.where`` and boolean indexing, two host syncs per render, in every step of
        the densification window; sums over the camera axis need none (issue 21, P3). It also takes
        a true maximum over cameras where gsplat's scatter keeps any one of them. Packed renders go
        to gsplat's own."""
        if packed:
            return super()._update_state(params, state, info, packed=packed)
        g = info[self.key_for_gradient]
        grads = (g.absgrad if self.absgrad else g.grad).clone()  # [C, N, 2]
        grads[..., 0] *= info["width"] / 2.0 * info["n_cameras"]  # to [-1, 1] screen space, as gsplat
        grads[..., 1] *= info["height"] / 2.0 * info["n_cameras"]
        n = len(params["means"])
        for key in ("grad2d", "count") + (("radii",) if self.refine_scale2d_stop_iter > 0 else ()):
            if state[key] is None:
                state[key] = torch.zeros(n, device=grads.device)
        seen = (info["radii"] > 0).all(dim=-1)  # [C, N]
        state["grad2d"] += torch.where(seen, grads.norm(dim=-1), 0.0).sum(0)
        state["count"] += seen.sum(0)
        if self.refine_scale2d_stop_iter > 0:
            radii = info["radii"].amax(dim=-1) / float(max(info["width"], info["height"]))
            torch.maximum(state["radii"], torch.where(seen, radii, 0.0).amax(0), out=state["radii"])

    def step_post_backward(self, params, optimizers, state, step, info, packed: bool = False) -> None:
        super().step_post_backward(params, optimizers, state, step, info, packed=packed)
        # gsplat 1.5.3 writes `step % self.reset_every == 0 & step > 0`, a chained comparison that is
        # never true, so its opacity reset never runs. reset_opa clamps opacities to a value, so
        # doing it here is harmless if gsplat fixes that.
        if 0 < step < self.refine_stop_iter and step % self.reset_every == 0:
            reset_opa(params=params, optimizers=optimizers, state=state, value=self.prune_opa * 2.0)

    @torch.no_grad()
    def _grow_gs(self, params, optimizers, state: dict[str, Any], step: int) -> tuple[int, int]:
        n = len(params["means"])
        room = max(self.max_gaussians - n, 0)
        grads = state["grad2d"] / state["count"].clamp_min(1)
        is_grad_high = grads > self.grow_grad2d
        is_small = torch.exp(params["scales"]).max(dim=-1).values <= self.grow_scale3d * state["scene_scale"]
        is_split = is_grad_high & ~is_small
        if step < self.refine_scale2d_stop_iter:
            is_split |= state["radii"] > self.grow_scale2d
        is_dupli = is_grad_high & is_small
        # Each duplicate or split adds one Gaussian: keep the highest-gradient candidates that fit.
        cand = is_dupli | is_split
        if int(cand.sum()) > room:
            keep = torch.zeros_like(cand)
            if room > 0:
                score = torch.where(cand, grads, torch.full_like(grads, -1.0))
                keep[score.topk(room).indices] = True
            is_dupli, is_split = is_dupli & keep, is_split & keep
        n_dupli, n_split = int(is_dupli.sum()), int(is_split.sum())
        if n_dupli > 0:
            duplicate(params=params, optimizers=optimizers, state=state, mask=is_dupli)
        is_split = torch.cat([is_split, torch.zeros(n_dupli, dtype=torch.bool, device=is_split.device)])
        if n_split > 0:
            split(
                params=params,
                optimizers=optimizers,
                state=state,
                mask=is_split,
                revised_opacity=self.revised_opacity,
            )
        return n_dupli, n_split

    @torch.no_grad()
    def _prune_gs(self, params, optimizers, state: dict[str, Any], step: int) -> int:
        if len(params["means"]) <= self.prune_to:
            return 0
        center = state.get("scene_center")
        if not self.prune_scale3d_by_distance or center is None or step <= self.reset_every:
            return super()._prune_gs(params, optimizers, state, step)
        # gsplat's rule with the size limit scaled by max(1, distance / extent): ``scene_center``
        # (x, y, z) is the training cameras' mean centre (the fitter puts it in the state; a tuple,
        # since gsplat's ops index every tensor of the state by Gaussian).
        scale = state["scene_scale"]
        dist = (params["means"] - params["means"].new_tensor(center)).norm(dim=-1)
        limit = self.prune_scale3d * dist.clamp_min(scale)
        is_prune = torch.sigmoid(params["opacities"].flatten()) < self.prune_opa
        is_prune |= torch.exp(params["scales"]).max(dim=-1).values > limit
        if step < self.refine_scale2d_stop_iter:
            is_prune |= state["radii"] > self.prune_scale2d
        n_prune = int(is_prune.sum())
        if n_prune > 0:
            remove(params=params, optimizers=optimizers, state=state, mask=is_prune)
        return n_prune
