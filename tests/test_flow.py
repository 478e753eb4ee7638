"""Rectified flow: noise levels, targets, loss, Euler sampling with CFG (against exact answers)."""

from __future__ import annotations

import pytest
import torch

from fourdgen.diffusion.flow import (
    add_noise,
    euler_sample,
    flow_loss,
    make_scheduler,
    sample_sigmas,
    shift_sigma,
    velocity_target,
)


def test_sigmas_range_shift_and_seed():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(10_000, generator=g)
    assert s.min() > 0 and s.max() <= 1 and abs(s.mean().item() - 0.5) < 0.02
    shifted = sample_sigmas(10_000, shift=3.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, shift_sigma(s, 3.0))
    assert shifted.mean() > s.mean() + 0.1  # shift > 1 spends more steps near noise
    assert shift_sigma(torch.tensor([0.0, 1.0]), 5.0).tolist() == [0.0, 1.0]
    ln = sample_sigmas(5000, mode="logit_normal", generator=g)
    assert abs(ln.median().item() - 0.5) < 0.03
    with pytest.raises(ValueError, match="mode"):
        sample_sigmas(2, mode="cosine")


def test_scheduler_matches_the_shift_formula():
    sched = make_scheduler(shift=3.0)
    sched.set_timesteps(6)
    # diffusers spaces sigmas linearly down to the *shifted* smallest training sigma, then shifts
    base = torch.linspace(1.0, float(shift_sigma(torch.tensor(1 / 1000), 3.0)), 6)
    torch.testing.assert_close(sched.sigmas[:-1], shift_sigma(base, 3.0))
    assert sched.sigmas[-1] == 0
    torch.testing.assert_close(sched.timesteps, 1000 * sched.sigmas[:-1])


def test_noise_target_and_masked_loss():
    x0, n = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    xt = add_noise(x0, n, sigma)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], n[2])
    # the velocity is the derivative of the path: x_s = x0 + s (n - x0)
    torch.testing.assert_close(
        (add_noise(x0, n, sigma + 1e-3) - xt) / 1e-3, velocity_target(x0, n), atol=1e-3, rtol=1e-3
    )
    pred = torch.zeros(2, 2, 3)
    target = torch.tensor([[[1.0] * 3, [3.0] * 3], [[2.0] * 3, [2.0] * 3]])
    assert flow_loss(pred, target, torch.rand(2)).item() == pytest.approx((5 + 4) / 2)
    mask = torch.tensor([[[1.0], [0.0]], [[1.0], [1.0]]])  # first sample: only its first row counts
    assert flow_loss(pred, target, torch.rand(2), mask=mask).item() == pytest.approx((1 + 4) / 2)


def test_euler_with_exact_velocity_reaches_the_data():
    """For data = a point x*, the exact velocity is (x - x*) / sigma and paths are straight, so
    Euler lands on x* for any schedule."""
    target = torch.tensor([[0.3, -1.2, 2.0]])

    def velocity(x, timestep):
        sigma = (timestep / 1000).view(-1, 1)
        return (x - target) / sigma

    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    for shift in (1.0, 5.0):
        out = euler_sample(velocity, noise, num_steps=7, shift=shift)
        torch.testing.assert_close(out, target.expand(4, 3), atol=1e-4, rtol=0)


def test_classifier_free_guidance_combines_velocities():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])

    def towards(p):
        return lambda x, t: (x - p) / (t / 1000).view(-1, 1)

    noise = torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    # exact-velocity fields for point targets a (cond) and b (uncond): guidance w extrapolates to
    # b + w (a - b) along straight paths.
    out = euler_sample(towards(a), noise, num_steps=5, guidance_scale=3.0, uncond_velocity=towards(b))
    torch.testing.assert_close(out, (b + 3.0 * (a - b)).expand(2, 2), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="uncond_velocity"):
        euler_sample(towards(a), noise, num_steps=2, guidance_scale=2.0)


@pytest.mark.slow  # convergence test: in the default suite, deselect with -m 'not slow'
def test_flow_matching_learns_a_distribution():
    """A tiny MLP trained with this loss samples the two-point training distribution; an
    untrained one does not."""
    torch.manual_seed(0)
    data = torch.tensor([[-1.0, 0.5], [1.0, -0.5]])
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 64),
        torch.nn.SiLU(),
        torch.nn.Linear(64, 64),
        torch.nn.SiLU(),
        torch.nn.Linear(64, 2),
    )

    def velocity(x, timestep):
        return net(torch.cat([x, (timestep / 1000)[:, None]], 1))

    def sample_error():
        samples = euler_sample(velocity, torch.randn(256, 2), num_steps=30)
        return torch.cdist(samples, data).min(1).values.median().item()

    before = sample_error()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(1500):
        x0 = data[torch.randint(2, (128,), generator=g)]
        noise, sigma = torch.randn(128, 2, generator=g), sample_sigmas(128, generator=g)
        loss = flow_loss(
            velocity(add_noise(x0, noise, sigma), 1000 * sigma), velocity_target(x0, noise), sigma
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sample_error()
    assert before > 0.3 and after < 0.1, (before, after)


def _gaussian_velocity(m: float, s: float):
    """Exact rectified-flow velocity for data N(m, s^2) and noise N(0, 1) at ``t = timestep / 1000``:
    ``u = (t - (1 - t) s^2) / V (x - (1 - t) m) - m``, ``V = (1 - t)^2 s^2 + t^2``. Its ODE carries
    noise ``n`` at t = 1 to ``m + s n`` at t = 0."""

    def velocity(x, timestep):
        t = timestep.to(x).reshape(-1, *[1] * (x.ndim - 1)) / 1000
        V = (1 - t) ** 2 * s * s + t * t
        return (t - (1 - t) * s * s) / V * (x - (1 - t) * m) - m

    return velocity


def test_unipc_schedule_is_wans_flow_shift_3():
    """Wan2.1's UniPC flow sigmas by hand: N of linspace(1, 1/1000, N + 1), each shifted by
    3 s / (1 + 2 s); then a final sigma 0; timesteps int(1000 * sigma)."""
    sched = make_scheduler(3.0, "unipc")
    sched.set_timesteps(50)
    raw = [1 - i * (1 - 1 / 1000) / 50 for i in range(50)]
    ref = torch.tensor([3 * r / (1 + 2 * r) for r in raw], dtype=torch.float64)
    torch.testing.assert_close(sched.sigmas[:-1].double(), ref, atol=2e-6, rtol=0)
    assert sched.sigmas[-1] == 0
    assert (sched.timesteps - (1000 * ref).floor().long()).abs().max() <= 1  # 1 - 1e-6 at the start
    with pytest.raises(ValueError, match="sampler"):
        make_scheduler(3.0, "ddim")


def test_unipc_sampler_reaches_the_exact_flow_endpoint():
    """50 UniPC steps (shift 3) land on the closed-form endpoint ``m + s n``; Euler with the same
    steps is an order of magnitude further off (UniPC is second order)."""
    m, s = 0.7, 0.3
    noise = torch.randn(4, 1, 64, generator=torch.Generator().manual_seed(0))
    exact = m + s * noise
    unipc = euler_sample(_gaussian_velocity(m, s), noise, num_steps=50, shift=3.0, sampler="unipc")
    euler = euler_sample(_gaussian_velocity(m, s), noise, num_steps=50, shift=3.0)
    err_unipc, err_euler = (unipc - exact).abs().max().item(), (euler - exact).abs().max().item()
    assert err_unipc < 0.01 and err_euler > 10 * err_unipc, (err_unipc, err_euler)
