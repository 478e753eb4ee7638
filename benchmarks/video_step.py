"""Training-step time and peak memory of the stage-1 DiT with a bf16 base: 4DNeX (width fusion,
LoRA on attention) or One4D (``--coupling dlc``: two-branch LoRA on the blocks' linears, five
control links, UMC channels).

Random weights in a named size (no checkpoint needed), random latents of a clip of ``--frames``
x ``--height`` x ``--width`` pixels with the Wan2.1 VAE's factors (4 in time, 8 in space), fused
RGB|XYZ width-wise, as one bf16-mixed step (autocast) of LoRA training with AdamW:

    python benchmarks/video_step.py --preset 1.3b 14b-i2v --frames 49 --height 480 --width 720
    python benchmarks/video_step.py --preset 14b-i2v --coupling dlc
"""

from __future__ import annotations

import argparse
import time

import torch

from fourdgen.diffusion.conditioning import MaskedFrames
from fourdgen.diffusion.flow import add_noise, flow_loss, sample_sigmas, velocity_target
from fourdgen.nn.decoupled_lora import DecoupledLoRAControl
from fourdgen.stages.video import VideoDiffusion


def bench(preset: str, args: argparse.Namespace) -> dict:
    torch.cuda.reset_peak_memory_stats()
    extra = {}
    if args.coupling == "dlc":
        extra = {"coupling": DecoupledLoRAControl(rank=args.rank), "conditioning": MaskedFrames()}
    model = VideoDiffusion(
        **extra,
        transformer={"preset": preset},
        vae={"preset": "wan2.1"},
        lora_rank=args.rank,
        lora_alpha=args.rank / 2,
        base_dtype="bfloat16",
        gradient_checkpointing=not args.no_checkpointing,
    ).cuda()
    t0 = time.perf_counter()
    model.configure_model()
    build_s = time.perf_counter() - t0
    tr = model.transformer
    F, h, w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    if args.coupling == "dlc":  # channel-fused RGB|XYZ, UMC channels of the RGB branch
        x0 = torch.randn(1, 32, F, h, w, device="cuda")
        obs = torch.ones(1, args.frames, dtype=torch.bool, device="cuda")
        cond = model.conditioning(torch.randn(1, 16, F, h, w, device="cuda"), model.vae, obs)
    else:  # width-fused RGB|XYZ
        x0 = torch.randn(1, 16, F, h, 2 * w, device="cuda")
        cond = model.conditioning(torch.randn(1, 16, F, h, 2 * w, device="cuda"), model.vae)
    text = torch.randn(1, 512, tr.config.text_dim, device="cuda")
    image = torch.randn(1, 257, tr.config.image_dim, device="cuda") if tr.config.image_dim else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            sigma = sample_sigmas(1, device="cuda")
            noise = torch.randn_like(x0)
            v = model.velocity(add_noise(x0, noise, sigma), cond, sigma * 1000, text, image)
            loss = flow_loss(v, velocity_target(x0, noise), sigma)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    tokens = F * (h // 2) * (2 * w // 2)  # both layouts: two clips' worth of tokens per step
    return {
        "preset": preset,
        "params_b": sum(p.numel() for p in tr.parameters()) / 1e9,
        "trainable_m": sum(p.numel() for p in tr.parameters() if p.requires_grad) / 1e6,
        "tokens": tokens,
        "s_per_step": sorted(times)[len(times) // 2],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "build_s": build_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["1.3b"])
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--coupling", choices=["width", "dlc"], default="width")
    args = p.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, coupling {args.coupling}")
    print("| preset | params (B) | LoRA+new (M) | tokens | s/step | peak GiB | build s |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.preset:
        r = bench(preset, args)
        print(
            f"| {r['preset']} | {r['params_b']:.2f} | {r['trainable_m']:.1f} | {r['tokens']} | "
            f"{r['s_per_step']:.2f} | {r['peak_gib']:.1f} | {r['build_s']:.1f} |",
            flush=True,
        )
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
