"""The synthetic scene ray-cast on CUDA (the default where there is one) equals the CPU render."""

from __future__ import annotations

import pytest
import torch

from fourdgen.data.synthetic import SyntheticConfig, make_scene

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_render_equals_the_cpu_render():
    cfg = SyntheticConfig(num_views=2, num_frames=3, height=48, width=64, layout="orbit")
    cpu, gpu = make_scene(cfg, device="cpu"), make_scene(cfg)  # default: CUDA here
    assert gpu.rgb.device.type == "cpu"  # returned on the CPU either way
    same = (cpu.mask == gpu.mask).float().mean().item()
    assert same > 0.999, same  # rays grazing an edge may land on either side
    keep = cpu.mask == gpu.mask
    err = (gpu.rgb - cpu.rgb).abs().amax(-1)  # supersampled: a sub-pixel ray may flip at an edge
    assert err.mean() < 1e-4 and (err > 1e-3).float().mean() < 1e-3, (err.mean(), err.max())
    torch.testing.assert_close(
        gpu.depth * keep, cpu.depth * keep, atol=1e-4, rtol=1e-4
    )  # fp32 ray-sphere roots: some digits cancel
    torch.testing.assert_close(gpu.centers, cpu.centers)
