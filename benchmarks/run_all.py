"""Every performance figure of issue 21 at its paper size on one GPU, in one table.

Each figure is measured beside its reference in the same run (machines are noisy: ratios, not
absolute times, are what compare across runs):

- P1: fused view-OR-time attention (the library path), fwd and fwd+bwd, against the ideal = dense
  SDPA x the share of blocks the fused path computes. Target <= 1.10x / 1.15x.
- P1b: Full-4D's view-OR-time-OR-cross-half attention, fwd+bwd, same ideal. Target: below 1.52x.
- P2: 14B I2V LoRA training step, 4DNeX width fusion and One4D DLC (49 x 480 x 720), against the
  bf16 8192^3 matmul rate (MFU, ``fourdgen.metrics.flops``). Target MFU >= 50%.
- P3: Full-4D 4DGS fit, 6 views x 81 frames at 384x672, 120k Gaussians, 17k steps, against the static
  step at the same count. Target <= 5 min.
- P4: reconstructor inference, 8 x 8 grid at 350x518 (VGGT-1B + 4Real additions), against plain
  VGGT on the same frames. Target <= 1.0 s.

P3 is projected from the compiled fine-stage step time at a fixed count of 120k Gaussians (no
densification), times 17k steps; gsplat's first-use build and the fit's data preparation are not in it.

    python benchmarks/run_all.py                 # paper sizes, one GPU (about 10 minutes)
    python benchmarks/run_all.py --only P1 P4
    python benchmarks/run_all.py --tiny          # every figure at toy sizes on the CPU (a smoke test)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

from fourdgen.metrics.flops import matmul_rate  # noqa: E402
from fourdgen.nn.fused_attention import grid_attention  # noqa: E402
from fourdgen.nn.grid_layout import GridLayout  # noqa: E402
from fourdgen.nn.view_time_mask import ViewTimeMask, computed_fraction  # noqa: E402


@dataclass
class Figure:
    id: str
    what: str
    value: float
    unit: str
    reference: float  # the same-run reference, in the same unit (nan where the figure is a ratio itself)
    reference_what: str
    ratio: float
    target: str
    met: bool | None


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], object], dev: torch.device, iters: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs after ``warmup`` (synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def attention_figures(cfg: dict, dev: torch.device, iters: int) -> list[Figure]:
    """P1 (view OR time) and P1b (plus Full-4D's cross-half term): library path vs its ideal."""
    out = []
    for spec in cfg["attention"]:
        out += _attention_grid(*spec, cfg, dev, iters if spec[0] == "P1" else max(2, iters // 3))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _attention_grid(
    fid: str, layout: GridLayout, heads: int, terms: tuple[str, ...], cfg: dict, dev: torch.device, iters: int
) -> list[Figure]:
    mask = ViewTimeMask(terms)
    try:
        frac = computed_fraction(mask.block_mask(layout, dev))
    except Exception:  # no block mask on this device (a CPU without flex): the exact density
        frac = mask.density(layout)
    name = f"{layout.views}v x {layout.frames}f x {layout.frame_tokens} tok, {heads} heads, {'|'.join(terms)}"
    # q/k/v as [B, H, N, D] tensors, and (P1) as the DiT hands them: [B, N, H, D] transposed
    out = []
    for heads_inner in (False, True) if fid == "P1" else (False,):
        out += _attention_layout(fid, layout, heads, mask, frac, name, heads_inner, cfg, dev, iters)
    return out


def _attention_layout(fid, layout, heads, mask, frac, name, heads_inner, cfg, dev, iters) -> list[Figure]:
    g = torch.Generator(device=dev).manual_seed(0)
    N, D = layout.num_tokens, cfg["head_dim"]
    shape = (1, N, heads, D) if heads_inner else (1, heads, N, D)

    def leaf():
        x = torch.randn(shape, device=dev, dtype=cfg["dtype"], generator=g)
        return (x.transpose(1, 2) if heads_inner else x).detach().requires_grad_()

    q, k, v = leaf(), leaf(), leaf()
    if heads_inner:
        name += ", heads inner"

    def fwd_bwd(attn):
        def run():
            attn().sum().backward()
            q.grad = k.grad = v.grad = None

        return run

    def dense():
        return F.scaled_dot_product_attention(q, k, v)

    with torch.no_grad():
        dense_f = timed(dense, dev, iters)
    dense_fb = timed(fwd_bwd(dense), dev, iters)
    # the library path (auto), and the LSE path where the mask is view-OR-time (opt-in until measured)
    backends = ["auto"] + (["lse"] if mask.is_view_or_time(layout) and not heads_inner else [])
    out = []
    for backend in backends:

        def fused(backend=backend):
            return grid_attention(q, k, v, layout, mask, backend)

        with torch.no_grad():
            fused_f = timed(fused, dev, iters)
        fused_fb = timed(fwd_bwd(fused), dev, iters)
        for what, val, ideal, target in (
            ("fwd", fused_f, dense_f * frac, 1.10),
            ("fwd+bwd", fused_fb, dense_fb * frac, 1.15),
        ):
            if fid == "P1b" and what == "fwd":
                continue
            ratio = val / ideal
            bound = target if fid == "P1" else 1.52
            out.append(
                Figure(
                    fid,
                    f"attention {what} ({backend}), {name}",
                    val * 1e3,
                    "ms",
                    ideal * 1e3,
                    f"ideal (dense x {frac:.3f} blocks)",
                    ratio,
                    f"<= {bound:.2f}x" if fid == "P1" else f"< {bound:.2f}x",
                    ratio <= bound if fid == "P1" else ratio < bound,
                )
            )
    return out


P2_POLICIES = ("full", "keep_attention", "keep_attention+compile")


def video_figures(cfg: dict, dev: torch.device, peak: float, policies=P2_POLICIES) -> list[Figure]:
    """P2: MFU of the 14B LoRA training step, both stage-1 couplings (``benchmarks/video_step.py``)."""
    import video_step

    out = []
    for coupling in ("width", "dlc"):
        args = argparse.Namespace(**cfg["video"], coupling=coupling, device=str(dev), no_checkpointing=False)
        for r in video_step.bench_policies(cfg["video_preset"], args, list(policies), peak):
            out.append(
                Figure(
                    "P2",
                    f"{cfg['video_preset']} LoRA step, {'4DNeX' if coupling == 'width' else 'One4D DLC'}, "
                    f"checkpointing {r['policy']}: {r['s_per_step']:.2f} s, {r['tflop_per_step']:.1f} TFLOP, "
                    f"peak {r['peak_gib']:.1f} GiB",
                    r["mfu"] * 100,
                    "% MFU",
                    peak / 1e12,
                    "bf16 matmul TFLOP/s",
                    r["mfu"],
                    ">= 50%",
                    r["mfu"] >= 0.5,
                )
            )
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def fit_figures(
    cfg: dict, dev: torch.device, profile: bool = False, sync_debug: bool = False, host_times: bool = False
) -> list[Figure]:
    """P3: the 4DGS fit's step at a fixed Gaussian count (``benchmarks/fit_speed.py``), projected."""
    import fit_speed

    fit = cfg["fit"]
    with tempfile.TemporaryDirectory() as tmp:
        args = argparse.Namespace(
            config="lightning_configs/fit/full4d.yaml",
            views=fit["views"],
            frames=fit["frames"],
            size=fit["height"],
            height=fit["height"],
            width=fit["width"],
            steps=fit["timed_steps"],
            warmup=fit["warmup"],
            profile=profile,
            sync_debug=sync_debug,
            host_times=host_times,
            scene_dir=f"{tmp}/scene",
        )
        dyn = fit_speed.run(args, fit["points"], True, dev.type == "cuda", f"{tmp}/dyn")
        print(f"P3 dynamic (compiled): {dyn}", flush=True)  # a time limit in the static run keeps it
        args.profile = args.sync_debug = False
        static = fit_speed.run(args, fit["points"], False, False, f"{tmp}/static")
    minutes = dyn["ms_per_step"] * fit["steps"] / 60e3
    return [
        Figure(
            "P3",
            f"4DGS fit, {fit['views']} views x {fit['frames']} frames at {fit['height']}x{fit['width']}, "
            f"{dyn['gaussians']:,} Gaussians: {dyn['ms_per_step']:.1f} ms/step x {fit['steps']} steps",
            minutes,
            "min",
            static["ms_per_step"] * fit["steps"] / 60e3,
            "static step at the same count (min)",
            dyn["ms_per_step"] / static["ms_per_step"],
            "<= 5 min",
            minutes <= 5.0,
        )
    ]


def recon_figures(cfg: dict, dev: torch.device, iters: int, profile: bool = False) -> list[Figure]:
    """P4: feed-forward reconstruction of a V x T grid, inference (``benchmarks/recon_speed.py``'s
    setup): eager, then with compiled blocks (``VGGT.compile_blocks``, CUDA), each against plain
    VGGT under the same treatment."""
    from fourdgen.models.gaussian_recon import GaussianReconstructor

    V, T, H, W = cfg["recon"]
    x = torch.rand(1, V, T, 3, H, W, device=dev)
    modes = ("eager", "compiled") if dev.type == "cuda" else ("eager",)
    secs = {}
    for name, kw in (("full", {}), ("plain", {"temporal": False, "camera_token_replacement": False})):
        model = GaussianReconstructor(cfg["recon_preset"], **kw).to(dev).eval()
        run = model if name == "full" else model.vggt
        if profile and name == "full" and dev.type == "cuda":
            import recon_speed

            ms = recon_speed.breakdown(model, x)
            parts = ", ".join(f"{k} {v:.1f}" for k, v in ms.items())
            print(f"P4 eager breakdown (GPU ms): {parts}", flush=True)
        for mode in modes:
            if mode == "compiled":
                model.vggt.compile_blocks()

            def step(run=run):
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
                    run(x)

            t0 = time.perf_counter()
            secs[name, mode] = timed(step, dev, iters, warmup=1)
            took = time.perf_counter() - t0
            print(f"P4 {name} {mode}: {secs[name, mode]:.3f} s (measured in {took:.0f} s)", flush=True)
        del model, run
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return [
        Figure(
            "P4",
            f"reconstructor ({cfg['recon_preset']}), {V} x {T} grid at {H}x{W}, inference, {mode} blocks",
            secs["full", mode],
            "s",
            secs["plain", mode],
            f"plain VGGT, same frames, {mode} (s)",
            secs["full", mode] / secs["plain", mode],
            "<= 1.0 s",
            secs["full", mode] <= 1.0,
        )
        for mode in modes
    ]


PAPER = dict(
    attention=[
        ("P1", GridLayout(8, 8, 30, 52), 40, ("same_view", "same_time")),
        ("P1b", GridLayout(6, 42, 24, 42, target_frames=21), 24, ("same_view", "same_time", "cross_half")),
    ],
    head_dim=128,
    dtype=torch.bfloat16,
    video_preset="14b-i2v",
    video=dict(frames=49, height=480, width=720, rank=64, steps=2, warmup=1),
    fit=dict(
        views=6, frames=81, height=384, width=672, points=120_000, steps=17_000, timed_steps=50, warmup=10
    ),
    recon_preset="1b",
    recon=(8, 8, 350, 518),
    matmul=8192,
    iters=10,
)
TINY = dict(
    attention=[
        ("P1", GridLayout(2, 3, 2, 3), 2, ("same_view", "same_time")),
        ("P1b", GridLayout(2, 4, 2, 3, target_frames=2), 2, ("same_view", "same_time", "cross_half")),
    ],
    head_dim=16,
    dtype=torch.float32,
    video_preset="tiny",
    # aot_eager: the compiled rows' plumbing without inductor's C++ build on the CPU
    video=dict(
        frames=5, height=32, width=48, rank=4, steps=1, warmup=1, compile_kwargs={"backend": "aot_eager"}
    ),
    fit=dict(views=2, frames=2, height=24, width=32, points=200, steps=17_000, timed_steps=2, warmup=1),
    recon_preset="tiny",
    recon=(2, 2, 28, 28),
    matmul=128,
    iters=2,
)


HEADER = (
    "| id | figure | value | reference (same run) | ratio | target | met |",
    "|---|---|---|---|---|---|---|",
)


def row(f: Figure) -> str:
    ref = f"{f.reference:.4g} ({f.reference_what})"
    met = "-" if f.met is None else ("yes" if f.met else "no")
    return f"| {f.id} | {f.what} | {f.value:.4g} {f.unit} | {ref} | {f.ratio:.2f} | {f.target} | {met} |"


def table(figures: list[Figure], dev: str, peak: float) -> str:
    head = f"device: {dev}, torch {torch.__version__}; bf16 matmul reference {peak / 1e12:.1f} TFLOP/s"
    return "\n".join([head, *HEADER, *(row(f) for f in figures)])


def main(argv: list[str] | None = None) -> list[Figure]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: checks every figure runs")
    p.add_argument("--only", nargs="+", choices=["P1", "P2", "P3", "P4"], default=["P1", "P2", "P3", "P4"])
    p.add_argument("--profile-fit", action="store_true", help="P3: print the dynamic step's slowest kernels")
    p.add_argument("--profile-recon", action="store_true", help="P4: GPU time by component (eager)")
    p.add_argument("--sync-debug", action="store_true", help="P3: count the step's host syncs by site")
    p.add_argument("--host-times", action="store_true", help="P3: host time per step by part of the step")
    p.add_argument(
        "--policies",
        nargs="+",
        choices=P2_POLICIES,
        default=list(P2_POLICIES),
        help="P2: the checkpoint policies to time (a 14B step with every policy takes about 10 minutes)",
    )
    args = p.parse_args(argv)
    cfg = TINY if args.tiny else PAPER
    dev = torch.device("cpu" if args.tiny else "cuda")
    name = "cpu" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    peak = matmul_rate(dev, n=cfg["matmul"], dtype=torch.bfloat16)
    sections = {
        "P1": lambda: attention_figures(cfg, dev, cfg["iters"]),
        "P2": lambda: video_figures(cfg, dev, peak, args.policies),
        "P3": lambda: fit_figures(cfg, dev, args.profile_fit, args.sync_debug, args.host_times),
        "P4": lambda: recon_figures(cfg, dev, cfg["iters"], args.profile_recon),
    }
    print(f"running {' '.join(args.only)} on {name}; rows as they come, the table at the end", flush=True)
    figures: list[Figure] = []
    for key in ("P1", "P2", "P3", "P4"):
        if key in args.only:
            t0 = time.perf_counter()
            new = sections[key]()
            for f in new:  # a partial run (a time limit) keeps what it measured
                print(row(f), flush=True)
            print(f"({key}: {time.perf_counter() - t0:.0f} s)", flush=True)
            figures += new
    print(table(figures, name, peak), flush=True)
    return figures


if __name__ == "__main__":
    main()
