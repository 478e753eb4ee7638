"""Time the 4D deformation field (HexPlane + MLP) forward and forward+backward, and list the
slowest kernels, at Full-4D/4DGaussians settings.

All points share one time, as in a render. ``grid_sample`` looks all six planes up with
grid_sample; ``matmul time planes`` takes the HexPlane's shared-time path for the three time planes.
``--compile`` also times ``torch.compile(field, dynamic=True)`` with both.

    python benchmarks/deformation.py --points 120000 1000000 --compile
"""

from __future__ import annotations

import argparse
import time

import torch

from fourdgen.gaussians.deformation import DeformationField


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--points", type=int, nargs="+", default=[120_000])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    field = DeformationField(features=32, resolution=(64, 64, 64, 25), multires=(1, 2), width=64).to(dev)
    with torch.no_grad():  # non-zero heads, so gradients reach the whole field
        for head in (field.pos_head, field.scale_head, field.rot_head):
            head[-1].weight.normal_(0, 0.01)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    variants = {"grid_sample": (field, False), "matmul time planes": (field, True)}
    if args.compile:
        compiled = torch.compile(field, dynamic=True)
        variants["grid_sample, compiled"] = (compiled, False)
        variants["matmul time planes, compiled"] = (compiled, True)
    print("| N | variant | fwd ms | fwd+bwd ms | peak GiB |\n|---|---|---|---|---|")
    for n in args.points:
        x = torch.randn(n, 3, device=dev).clamp(-1, 1).requires_grad_(True)
        for name, (f, matmul) in variants.items():
            field.grid.shared_time_matmul = matmul
            t = torch.tensor(0.37, device=dev)

            def step(backward: bool, f=f, t=t, x=x):
                d = f(x, t)
                loss = d.d_means.sum() + d.d_log_scales.sum() + d.d_quats.sum()
                if backward:
                    loss.backward()

            ms = {}
            for backward in (False, True):
                for _ in range(3):
                    step(backward)
                sync()
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    step(backward)
                sync()
                ms[backward] = (time.perf_counter() - t0) / args.iters * 1e3
            peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
            print(f"| {n:,} | {name} | {ms[False]:.2f} | {ms[True]:.2f} | {peak:.2f} |", flush=True)
    if not args.profile:
        return
    x = torch.randn(args.points[0], 3, device=dev).clamp(-1, 1).requires_grad_(True)
    field.grid.shared_time_matmul = None  # the default: matmul path on CUDA

    def step(backward: bool):
        d = field(x, torch.tensor(0.37, device=dev))
        (d.d_means.sum() + d.d_log_scales.sum() + d.d_quats.sum()).backward()

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
