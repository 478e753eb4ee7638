"""Rectified flow (flow matching) for the video diffusion stage, in diffusers' convention.

``x_sigma = (1 - sigma) * x0 + sigma * noise`` with ``sigma`` in [0, 1] (1 = pure noise), the
model predicts the velocity ``v = noise - x0``, and Wan's timestep is ``1000 * sigma``.
Training draws ``sigma`` here; sampling uses diffusers' schedulers: ``"euler"``
(``FlowMatchEulerDiscreteScheduler``) or ``"unipc"`` (``UniPCMultistepScheduler`` in flow mode, the
scheduler of the Wan2.1 Diffusers checkpoints and so of 4DNeX's official inference).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000

# Progress of sampling loops (``on_step(i, num_steps)`` after each step), for front ends that show a
# bar (``fourdgen generate``); unset by default, so training and tests pay nothing.
_ON_STEP: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "fourdgen_sampling_progress", default=None
)


@contextlib.contextmanager
def sampling_callback(on_step: Callable[[int, int], None]) -> Iterator[None]:
    """Call ``on_step(i, num_steps)`` after every Euler step of :func:`euler_sample` in the block."""
    token = _ON_STEP.set(on_step)
    try:
        yield
    finally:
        _ON_STEP.reset(token)


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """SD3/Wan time shift ``shift * s / (1 + (shift - 1) * s)``: more steps near noise for ``shift > 1``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(
    batch: int,
    *,
    mode: str = "uniform",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training noise levels ``[batch]`` in (0, 1).

    ``mode``: ``"uniform"`` (4DNeX's uniform timestep sampling) or ``"logit_normal"`` (SD3); the
    shift is applied afterwards. Sampled on CPU with ``generator`` then moved, so a seed gives the
    same noise levels on every device.
    """
    if mode == "uniform":
        s = torch.rand(batch, generator=generator)
    elif mode == "logit_normal":
        s = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator))
    else:
        raise ValueError(f"sample_sigmas: mode must be 'uniform' or 'logit_normal', got {mode!r}")
    s = s.clamp(1.0 / NUM_TRAIN_TIMESTEPS, 1.0)
    return shift_sigma(s, shift).to(device)


def _expand(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.reshape(sigma.shape[0], *([1] * (x.ndim - 1))).to(x)


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """``x_sigma = (1 - sigma) x0 + sigma noise``; ``sigma [B]`` broadcast over ``x0 [B, ...]``."""
    s = _expand(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow regression target ``noise - x0``."""
    return noise - x0


def loss_weights(sigma: Tensor, weighting: str = "none") -> Tensor:
    """Per-sample loss weights ``[B]``: ``"none"`` (plain MSE, 4DNeX), or ``"cosmap"`` (SD3's
    ``2 / (pi (1 - 2 s + 2 s^2))``)."""
    if weighting == "none":
        return torch.ones_like(sigma)
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"loss_weights: weighting must be 'none' or 'cosmap', got {weighting!r}")


def flow_loss(
    pred: Tensor, target: Tensor, sigma: Tensor, weighting: str = "none", mask: Tensor | None = None
) -> Tensor:
    """Weighted MSE between predicted and target velocities, averaged per sample then over the
    batch. ``mask`` (broadcastable to ``pred``, 1 = counts) excludes e.g. conditioning frames."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        per = err.flatten(1).mean(1)
    else:
        m = mask.to(err).expand_as(err)
        per = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    return (loss_weights(sigma.to(per), weighting) * per).mean()


SAMPLERS = ("euler", "unipc")


def make_scheduler(shift: float = 1.0, sampler: str = "euler"):
    """A diffusers flow-matching scheduler with a fixed ``shift`` (Wan: 3.0 at 480p, 5.0 at 720p).

    ``"euler"``: ``FlowMatchEulerDiscreteScheduler``. ``"unipc"``: ``UniPCMultistepScheduler`` as the
    Wan2.1 Diffusers checkpoints configure it (``scheduler/scheduler_config.json``: flow prediction,
    flow sigmas, ``flow_shift``, order-2 ``bh2`` predictor-corrector, final sigma 0); its
    timesteps are integers, as the official pipeline feeds the DiT.
    """
    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    if sampler == "unipc":
        return UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            solver_order=2,
            solver_type="bh2",
            final_sigmas_type="zero",
        )
    raise ValueError(f"make_scheduler: sampler must be one of {SAMPLERS}, got {sampler!r}")


VelocityFn = Callable[[Tensor, Tensor], Tensor]


@torch.no_grad()
def euler_sample(
    velocity: VelocityFn,
    noise: Tensor,
    num_steps: int = 50,
    shift: float = 1.0,
    guidance_scale: float = 1.0,
    uncond_velocity: VelocityFn | None = None,
    scheduler=None,
    callback: Callable[[int, Tensor], Tensor] | None = None,
    sampler: str = "euler",
) -> Tensor:
    """Integrate from ``noise`` (sigma = 1) to data with the steps of ``sampler`` (see
    :func:`make_scheduler`; a given ``scheduler`` wins). The name stays for its callers: Euler is
    the default.

    ``velocity(x, timestep)`` returns the conditional velocity; ``timestep [B]`` is ``1000 * sigma``
    (Wan's convention). With ``guidance_scale != 1`` and ``uncond_velocity`` given, classifier-free
    guidance: ``v = v_u + w (v_c - v_u)``. ``callback(step, x) -> x`` may rewrite the sample after
    each step (e.g. to re-impose known conditioning frames).
    """
    sched = scheduler or make_scheduler(shift, sampler)  # fresh: UniPC keeps a history of outputs
    sched.set_timesteps(num_steps, device=noise.device)
    x = noise
    for i, t in enumerate(sched.timesteps):
        tb = t.expand(x.shape[0]).to(x.device)
        v = velocity(x, tb)
        if guidance_scale != 1.0:
            if uncond_velocity is None:
                raise ValueError("euler_sample: guidance_scale != 1 needs uncond_velocity")
            vu = uncond_velocity(x, tb)
            v = vu + guidance_scale * (v - vu)
        x = sched.step(v, t, x, return_dict=False)[0]
        if callback is not None:
            x = callback(i, x)
        if (on_step := _ON_STEP.get()) is not None:
            on_step(i, len(sched.timesteps))
    return x


def euler_sample_known(
    velocity: VelocityFn,
    noise: Tensor,
    x0: Tensor,
    known: Tensor | None,
    num_steps: int = 50,
    shift: float = 1.0,
    guidance_scale: float = 1.0,
    uncond_velocity: VelocityFn | None = None,
) -> Tensor:
    """:func:`euler_sample` with known cells: where ``known`` (broadcastable bool) is set, the sample
    is replaced by ``x0`` noised to each step's level (the model sees them as in training), and by
    ``x0`` itself at the end. ``known=None`` is plain sampling."""
    sched = make_scheduler(shift)
    sched.set_timesteps(num_steps, device=noise.device)

    def reimpose(i: int, x: Tensor) -> Tensor:
        if known is None:
            return x
        s = sched.sigmas[i + 1].expand(x.shape[0]).to(x)
        return torch.where(known, add_noise(x0, noise, s), x)

    x = euler_sample(
        velocity,
        reimpose(-1, noise),
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        uncond_velocity=uncond_velocity,
        scheduler=sched,
        callback=reimpose,
    )
    return x if known is None else torch.where(known, x0, x)
