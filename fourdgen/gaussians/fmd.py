"""Flow-matching distillation (FMD, Full-4D section 3.3, eqs. 12-13, appendix B).

A frozen multi-view video model regularises the 4D Gaussians on novel views: the whole clip rendered
from one camera of the interpolated path is encoded to latents ``z`` (through the frozen but
differentiable VAE encoder), noised to a sampled level, and the prior's velocity gives a clean
estimate that ``z`` is pulled toward. Our reading of the equations, whose symbols the text lost:

- eq. 12: ``x_t = (1 - t) z + t eps`` with ``eps ~ N(0, I)`` and ``t`` in (0, 1): the rectified-flow
  forward process the prior was trained with (:func:`fourdgen.diffusion.flow.add_noise`);
- the clean estimate: ``x0_hat = x_t - t v_theta(x_t, t, c)``, ``c`` = source-video latents, the
  point-cloud projection latents into the sampled camera and the relative camera;
- eq. 13: ``L_FMD = w(t) || z - sg(x0_hat) ||^2`` (mean over latent elements), ``sg`` = stop-gradient:
  only the render path gets gradients, the prior is never differentiated.

Since ``z - x0_hat = t (v_theta - (eps - z))``, the gradient is ``2 w(t) t (v_theta - v_target)``:
SDS's "predicted minus injected noise" in velocity form. The paper gives neither the range of ``t``,
nor ``w(t)``, the loss weight, CFG, or when FMD starts: the defaults here are ours (DreamFusion's
``t`` range [0.02, 0.98], ``w = 1``, the stage-1 sampling CFG) and each is a recipe option.

The prior is anything with the :class:`VideoPrior` methods: the trained Full-4D grid model
(:class:`fourdgen.stages.grid_prior.GridPrior`), or in tests an oracle with the exact velocity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fourdgen.diffusion.flow import add_noise
from fourdgen.gaussians.regularizers import NovelViewRegularizer, NovelViewRender, SourceClip

WEIGHTINGS = ("uniform", "sds")


class VideoPrior:
    """What FMD needs from a frozen video model (the base documents the contract).

    :meth:`setup` loads the model onto ``device`` and embeds what stays fixed (the source video,
    its depth, the caption); :meth:`encode` maps a rendered clip to latents *differentiably*;
    :meth:`velocity` predicts the flow velocity of noisy latents seen from a camera.
    """

    def setup(self, source: SourceClip, device: torch.device) -> None:
        raise NotImplementedError

    def encode(self, rgb: Tensor) -> Tensor:
        """``rgb [T, 3, H, W]`` in [0, 1] -> latents ``[1, C, F, h, w]`` with the graph to ``rgb``."""
        raise NotImplementedError

    def velocity(
        self,
        x: Tensor,
        sigma: Tensor,
        K: Tensor,
        w2c: Tensor,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Velocity ``[1, C, F, h, w]`` of noisy latents ``x`` at noise level ``sigma [1]`` for the
        novel camera ``K [3, 3]``, ``w2c [T, 4, 4]`` (no gradients needed)."""
        raise NotImplementedError


class FlowMatchingDistillation(NovelViewRegularizer):
    """FMD loss on one novel-view clip per step (logged as ``train/reg_fmd``).

    Args:
        prior: the frozen :class:`VideoPrior` (kept out of the fitter's checkpoint; loaded on the
            first call, again after a resume).
        weight: the loss weight (lambda_FMD; not given by the paper).
        start_step / every: from which global step and how often (paper: every step; its start is
            not given: Full-4D's recipe starts after the coarse stage).
        t_range: noise levels ``t ~ U[t_min, t_max]`` (not given; DreamFusion's [0.02, 0.98]).
        weighting: ``w(t)``: ``"uniform"`` (1: the x0-space MSE of eq. 13 as written) or ``"sds"``
            (``1 / t``: the gradient is ``2 (v_theta - v_target)``, SDS's unweighted form).
        guidance_scale: classifier-free guidance of the prior's velocity (1: none).
        source_view: the scene row that is the input video (None: the scene's ``source_view``).
        prior_device: where the prior runs, e.g. ``cuda:1`` (Full-4D uses one GPU for the prior and
            one for the Gaussians; None: the fitter's device). Renders move there with their graph.
        seed: noise and levels are drawn from ``(seed, step)``, so a resumed fit draws the same ones.
    """

    name = "fmd"
    needs_source = True

    def __init__(
        self,
        prior: VideoPrior,
        weight: float = 0.1,
        start_step: int = 0,
        every: int = 1,
        t_range: tuple[float, float] = (0.02, 0.98),
        weighting: str = "uniform",
        guidance_scale: float = 5.0,
        source_view: int | None = None,
        prior_device: str | None = None,
        seed: int = 0,
    ):
        super().__init__(weight=weight, start_step=start_step, every=every)
        lo, hi = (float(x) for x in t_range)
        if not 0.0 < lo <= hi < 1.0 + 1e-9:
            raise ValueError(
                f"FlowMatchingDistillation.t_range: expected 0 < t_min <= t_max <= 1, got {t_range}"
            )
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"FlowMatchingDistillation.weighting: expected one of {WEIGHTINGS}, got {weighting!r}"
            )
        # A plain attribute (the base is an nn.Module): the prior must never become a submodule.
        object.__setattr__(self, "prior", prior)
        self.t_range, self.weighting, self.guidance_scale = (lo, hi), weighting, guidance_scale
        self.source_view, self.prior_device, self.seed = source_view, prior_device, seed
        self.source: SourceClip | None = None
        self._ready = False
        self.last: dict[str, float] = {}
        self.last_estimate: Tensor | None = None

    def setup(self, source: SourceClip | None) -> None:
        if source is None:
            raise ValueError("FlowMatchingDistillation needs the scene's source clip (the fitter gives it)")
        self.source, self._ready = source, False

    def weight_at(self, sigma: Tensor) -> Tensor:
        """``w(t)`` of :attr:`weighting`."""
        return torch.ones_like(sigma) if self.weighting == "uniform" else 1.0 / sigma

    def forward(self, render: NovelViewRender) -> Tensor:
        device = torch.device(self.prior_device) if self.prior_device else render.rgb.device
        if not self._ready:
            if self.source is None:
                raise RuntimeError("FlowMatchingDistillation.setup was not called (the fitter calls it)")
            self.prior.setup(self.source, device)
            self._ready = True
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(render.step))
        z = self.prior.encode(render.rgb.to(device))  # [1, C, F, h, w], graph back to the Gaussians
        lo, hi = self.t_range
        sigma = (lo + (hi - lo) * torch.rand(1, generator=g)).to(device)
        noise = torch.randn(z.shape, generator=g).to(device)
        x_t = add_noise(z.detach(), noise, sigma)
        T = render.rgb.shape[0]
        w2c = render.w2c.to(device).expand(T, 4, 4) if render.w2c.ndim == 2 else render.w2c.to(device)
        with torch.no_grad():
            v = self.prior.velocity(x_t, sigma, render.K.to(device), w2c, self.guidance_scale, g)
            x0_hat = x_t - sigma.view(-1, 1, 1, 1, 1) * v.float()
        loss = self.weight_at(sigma)[0] * (z.float() - x0_hat).square().mean()
        self.last = {"t": float(sigma), "target_mse": float(loss.detach())}
        self.last_estimate = x0_hat  # detached: for inspection and tests
        return loss.to(render.rgb.device)
