"""Training-step time and peak memory of the stage-1 DiT with a bf16 base: 4DNeX (width fusion,
LoRA on attention) or One4D (``--coupling dlc``: two-branch LoRA on the blocks' linears, five
control links, UMC channels).

Random weights in a named size (no checkpoint needed), random latents of a clip of ``--frames``
x ``--height`` x ``--width`` pixels with the Wan2.1 VAE's factors (4 in time, 8 in space), fused
RGB|XYZ width-wise, as one bf16-mixed step (autocast) of LoRA training with AdamW:

    python benchmarks/video_step.py --preset 1.3b 14b-i2v --frames 49 --height 480 --width 720
    python benchmarks/video_step.py --preset 14b-i2v --coupling dlc

MFU (issue 21's convention, ``fourdgen.metrics.flops``): model FLOPs of a step over its time, over the
bf16 8192^3 matmul rate measured in the same run. The frozen base's linear layers count 2x forward
(forward + input gradients), attention 3x forward; gradient-checkpoint recompute is not counted.
"""

from __future__ import annotations

import argparse
import time

import torch

from fourdgen.backbones.wan import DEFAULT_VAE
from fourdgen.diffusion.conditioning import MaskedFrames
from fourdgen.diffusion.flow import add_noise, flow_loss, sample_sigmas, velocity_target
from fourdgen.diffusion.latents import scale_factors
from fourdgen.metrics.flops import count_flops, matmul_rate, mfu
from fourdgen.nn.checkpointing import checkpoint_function, compile_options
from fourdgen.nn.decoupled_lora import DecoupledLoRAControl
from fourdgen.stages.video import VideoDiffusion


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(preset: str, args: argparse.Namespace, peak_flops: float | None = None) -> dict:
    """One preset's step: time, memory and (given the matmul rate ``peak_flops``) MFU.
    ``args.device`` (default cuda) lets the tests run it tiny on the CPU."""
    return bench_policies(preset, args, [getattr(args, "checkpoint_policy", "full")], peak_flops)[0]


def bench_policies(
    preset: str, args: argparse.Namespace, policies: list[str], peak_flops: float | None = None
) -> list[dict]:
    """:func:`bench` for each checkpoint policy in turn on one built model (a 14B build takes
    longer than the steps it times); the policy is swapped through diffusers'
    ``enable_gradient_checkpointing``, as the stage installs it. ``policy+compile`` (or
    ``args.compile``) compiles the checkpointed blocks (``compile_blocks``)."""
    dev = torch.device(getattr(args, "device", "cuda"))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    extra = {}
    if args.coupling == "dlc":
        extra = {"coupling": DecoupledLoRAControl(rank=args.rank), "conditioning": MaskedFrames()}
    model = VideoDiffusion(
        **extra,
        transformer={"preset": preset},
        vae={"preset": DEFAULT_VAE[preset]},
        lora_rank=args.rank,
        lora_alpha=args.rank / 2,
        base_dtype="bfloat16",
        gradient_checkpointing=not args.no_checkpointing,
        checkpoint_policy=policies[0].partition("+")[0],
        compile_blocks=getattr(args, "compile", False),
    ).to(dev)
    t0 = time.perf_counter()
    model.configure_model()
    build_s = time.perf_counter() - t0
    tr = model.transformer
    ft, fs = scale_factors(model.vae)  # Wan2.1: 4 in time, 8 in space
    F, h, w = (args.frames - 1) // ft + 1, args.height // fs, args.width // fs
    if args.coupling == "dlc":  # channel-fused RGB|XYZ, UMC channels of the RGB branch
        x0 = torch.randn(1, 32, F, h, w, device=dev)
        obs = torch.ones(1, args.frames, dtype=torch.bool, device=dev)
        cond = model.conditioning(torch.randn(1, 16, F, h, w, device=dev), model.vae, obs)
    else:  # width-fused RGB|XYZ
        x0 = torch.randn(1, 16, F, h, 2 * w, device=dev)
        cond = model.conditioning(torch.randn(1, 16, F, h, 2 * w, device=dev), model.vae)
    text = torch.randn(1, 512, tr.config.text_dim, device=dev)
    image = torch.randn(1, 257, tr.config.image_dim, device=dev) if tr.config.image_dim else None
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)

    def forward():
        with amp:
            sigma = sample_sigmas(1, device=dev)
            noise = torch.randn_like(x0)
            v = model.velocity(add_noise(x0, noise, sigma), cond, sigma * 1000, text, image)
        return v, noise, sigma

    flops = count_flops(forward)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens = F * (h // 2) * (2 * w // 2)  # both layouts: two clips' worth of tokens per step
    results = []
    for entry in policies:
        policy, _, suffix = entry.partition("+")
        compiled = suffix == "compile" or getattr(args, "compile", False)
        options = compile_options(getattr(args, "compile_kwargs", None) or True) if compiled else None
        if not args.no_checkpointing:
            fn = checkpoint_function(policy, compile=options)
            tr.enable_gradient_checkpointing(gradient_checkpointing_func=fn)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.warmup + args.steps):
            _sync(dev)
            t0 = time.perf_counter()
            v, noise, sigma = forward()
            with amp:
                loss = flow_loss(v, velocity_target(x0, noise), sigma)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(dev)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]
        results.append(
            {
                "preset": preset,
                "policy": ("off" if args.no_checkpointing else policy) + (" + compile" if compiled else ""),
                "params_b": sum(p.numel() for p in tr.parameters()) / 1e9,
                "trainable_m": sum(p.numel() for p in tr.parameters() if p.requires_grad) / 1e6,
                "tokens": tokens,
                "s_per_step": step_s,
                "tflop_per_step": flops.lora_step() / 1e12,
                "attention_share": flops.attention / max(flops.total, 1),
                "mfu": mfu(flops.lora_step(), step_s, peak_flops) if peak_flops else float("nan"),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan"),
                "build_s": build_s,
            }
        )
    return results


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
    p.add_argument(
        "--checkpoint-policy",
        nargs="+",
        choices=["full", "keep_attention"],
        default=["full"],
        help="what checkpointing recomputes (several: each timed on the one built model)",
    )
    p.add_argument("--coupling", choices=["width", "dlc"], default="width")
    p.add_argument(
        "--compile", action="store_true", help="regional torch.compile of the DiT blocks (compile_blocks)"
    )
    args = p.parse_args()
    peak = matmul_rate("cuda")
    print(
        f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, coupling {args.coupling}, "
        f"checkpointing {'off' if args.no_checkpointing else ' / '.join(args.checkpoint_policy)}, "
        f"compiled blocks {args.compile}; "
        f"bf16 8192^3 matmul {peak / 1e12:.0f} TFLOP/s"
    )
    print(
        "| preset | checkpointing | params (B) | LoRA+new (M) | tokens | s/step | model TFLOP/step | MFU "
        "| peak GiB | build s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset in args.preset:
        for r in bench_policies(preset, args, args.checkpoint_policy, peak):
            print(
                f"| {r['preset']} | {r['policy']} | {r['params_b']:.2f} | {r['trainable_m']:.1f} | "
                f"{r['tokens']} | {r['s_per_step']:.2f} | {r['tflop_per_step']:.0f} | {r['mfu']:.1%} | "
                f"{r['peak_gib']:.1f} | {r['build_s']:.1f} |",
                flush=True,
            )
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
