"""Time the 4D deformation field (HexPlane + MLP) forward and forward+backward, and list the
slowest kernels, at Full-4D/4DGaussians settings.

    python benchmarks/deformation.py --points 120000
"""

from __future__ import annotations

import argparse
import time

import torch

from fourdgen.gaussians.deformation import DeformationField


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--points", type=int, default=120_000)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    field = DeformationField(features=32, resolution=(64, 64, 64, 25), multires=(1, 2), width=64).to(dev)
    x = torch.randn(args.points, 3, device=dev).clamp(-1, 1).requires_grad_(True)

    def step(backward: bool, t: float = 0.37):
        d = field(x, t)
        loss = (
            d.d_means.sum()
            + d.d_log_scales.sum()
            + d.d_quats.sum()
            + field.grid(x, torch.full_like(x[:, 0], t)).sum()
        )
        if backward:
            loss.backward()

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for backward in (False, True):
        for _ in range(3):
            step(backward)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step(backward)
        sync()
        ms = (time.perf_counter() - t0) / args.iters * 1e3
        print(f"{dev} N={args.points} {'fwd+bwd' if backward else 'fwd'}: {ms:.2f} ms")
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else []
    )
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            step(True)
        sync()
    key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=8, max_name_column_width=50))


if __name__ == "__main__":
    main()
