"""Feed-forward reconstruction time and peak memory (4Real-Video-V2, Table S1) of the ``1b``
preset: VGGT-1B + temporal attention + Gaussian head, random weights (the speed does not depend on
them), a grid of V views x T timesteps at 350 x 518, bf16 autocast on fp32 weights, inference.

Side by side in one run: the full reconstructor, and the same VGGT without the 4Real additions on
the same frames (each timestep its own group: what plain VGGT costs), so their ratio is the price
of temporal attention + Gaussian head.

    python benchmarks/recon_speed.py                      # 4x4, 8x8, 8x16
    python benchmarks/recon_speed.py --grids 8x16 --repeats 5
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch import nn

from fourdgen.models.gaussian_recon import GaussianReconstructor

PAPER_A100 = {(4, 4): (0.65, 13), (8, 8): (2.42, 31), (8, 16): (5.70, 60)}  # seconds, GB


def timed(fn, repeats: int) -> tuple[float, float]:
    """-> (median seconds, peak GB) of ``fn()`` after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def breakdown(model: GaussianReconstructor, x: torch.Tensor) -> dict[str, float]:
    """GPU milliseconds of one bf16 inference by component (eager; CUDA events around each module
    call, so the components' launch gaps count to "rest")."""
    vggt, agg = model.vggt, model.vggt.aggregator
    groups = {
        "dino": [agg.patch_embed.blocks],
        "frame": agg.frame_blocks,
        "global": agg.global_blocks,
        "temporal": agg.temporal_blocks or [],
        "camera": [vggt.camera_head],
        "depth": [vggt.depth_head],
        "gaussian": [model.gaussian_head],
    }
    spans: dict[str, list] = collections.defaultdict(list)

    def event() -> torch.cuda.Event:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    handles = []
    for name, modules in groups.items():
        for m in modules:
            if isinstance(m, nn.Module):
                handles.append(m.register_forward_pre_hook(lambda *_, n=name: spans[n].append([event()])))
                handles.append(m.register_forward_hook(lambda *_, n=name: spans[n][-1].append(event())))

    def step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    try:
        step()
        spans.clear()
        start = event()
        step()
        end = event()
        torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    ms = {n: sum(a.elapsed_time(b) for a, b in s) for n, s in spans.items()}
    ms["rest"] = start.elapsed_time(end) - sum(ms.values())
    ms["total"] = start.elapsed_time(end)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--grids", nargs="+", default=["4x4", "8x8", "8x16"], help="VxT")
    ap.add_argument("--height", type=int, default=350)
    ap.add_argument("--width", type=int, default=518)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    grids = [tuple(int(v) for v in g.split("x")) for g in args.grids]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    results = {}
    # One model on the GPU at a time, so that each peak counts its own weights only.
    for name, kw in (("full", {}), ("plain", {"temporal": False, "camera_token_replacement": False})):
        model = GaussianReconstructor("1b", **kw).cuda().eval()
        run = model if name == "full" else model.vggt
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters", flush=True)
        for V, T in grids:
            x = torch.rand(1, V, T, 3, args.height, args.width, device="cuda")

            def step(x=x, run=run):
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    run(x)

            results[name, V, T] = timed(step, args.repeats)
            del x
        del model, run
        torch.cuda.empty_cache()
    print("| V x T | frames | 4Real s | peak GB | plain VGGT s | peak GB | ratio | paper A100 s / GB |")
    print("|---|---|---|---|---|---|---|---|")
    for V, T in grids:
        (tf, mf), (tp, mp) = results["full", V, T], results["plain", V, T]
        ref = PAPER_A100.get((V, T))
        ref_s = f"{ref[0]:.2f} / {ref[1]}" if ref else "-"
        print(f"| {V}x{T} | {V * T} | {tf:.3f} | {mf:.1f} | {tp:.3f} | {mp:.1f} | {tf / tp:.2f} | {ref_s} |")


if __name__ == "__main__":
    main()
