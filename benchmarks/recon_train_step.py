"""One training step of the feed-forward reconstructor with the ``1b`` preset (VGGT-1B +
temporal blocks + Gaussian head, random weights): time and peak memory of the paper's two stages,
bf16 autocast on fp32 weights, AdamW, gsplat rendering, MSE + 0.5 LPIPS (VGG, random backbone: the
cost does not depend on its weights).

- static: 4 source + 4 target views at one instant, only the Gaussian head trains (backbone runs
  under no_grad);
- dynamic: 4 + 4 views x T timesteps, temporal blocks + Gaussian head train, with and without
  gradient checkpointing side by side (same run, so the ratio is what checkpointing costs).

    python benchmarks/recon_train_step.py --timesteps 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fourdgen.stages.recon import FeedForwardReconstruction


def bench(stage: str, T: int, ckpt: bool, args) -> tuple[float, float]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = FeedForwardReconstruction(
        preset="1b",
        training_stage=stage,
        num_source_views=4,
        num_target_views=4,
        backend="gsplat",
        gradient_checkpointing=ckpt,
        lpips_net=None,
        lpips_allow_random_backbone=True,
    ).cuda()
    opt = model.configure_optimizers()["optimizer"]
    rgb = torch.rand(args.batch, 8, T, 3, args.height, args.width, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.reconstruct_and_render(rgb, train=True)
        render, target = out["render"].flatten(0, 2).float(), out["target"].flatten(0, 2)
        loss = F.mse_loss(render, target) + 0.5 * model.lpips_loss.score(render, target).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return statistics.median(times), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--timesteps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--height", type=int, default=350)
    ap.add_argument("--width", type=int, default=518)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}")
    print("| stage | views x T | grad ckpt | s / step | peak GB |")
    print("|---|---|---|---|---|")
    for stage, T, ckpt in (
        ("static", 1, False),
        ("dynamic", args.timesteps, False),
        ("dynamic", args.timesteps, True),
    ):
        s, gb = bench(stage, T, ckpt, args)
        print(f"| {stage} | 8 x {T} | {'on' if ckpt else 'off'} | {s:.3f} | {gb:.1f} |", flush=True)


if __name__ == "__main__":
    main()
