"""Time and memory of one flow-matching distillation step at Full-4D's size.

A 4DGS scene of ``--gaussians`` random Gaussians with a deformation field renders the whole clip
(``--frames`` frames at ``--height x --width``) from one camera of the interpolated path; the clip
is encoded with gradients by the Wan VAE, the frozen grid model (``--preset``, random weights,
bf16) predicts the velocity of the two-view grid [source, novel] with CFG, and the FMD loss is
backpropagated into the Gaussians. Prints the phases (render, encode, prior, backward) and peaks.
With two GPUs, ``--prior-device cuda:1`` puts the prior on the second one (Full-4D's set-up).

    python benchmarks/fmd_step.py                       # 5B preset, 6 views, 81 frames, 384x672
    python benchmarks/fmd_step.py --preset tiny --frames 9 --height 64 --width 112 --gaussians 5000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fourdgen.backbones.text import HashTextEncoder
from fourdgen.data.protocols import SceneInfo
from fourdgen.data.synthetic import SyntheticConfig, make_cameras
from fourdgen.gaussians.deformation import DeformationField
from fourdgen.gaussians.fmd import FlowMatchingDistillation
from fourdgen.gaussians.regularizers import SourceClip
from fourdgen.nn.grid_coupling import ProjectionGrid
from fourdgen.stages.fit import Gaussian4DFitter
from fourdgen.stages.grid import GridDiffusion
from fourdgen.stages.grid_prior import GridPrior

TEXT = {"tiny": (32, 8), "5b": (4096, 512), "1.3b": (4096, 512), "14b": (4096, 512)}


def sync(*devices):
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="5b")
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=672)
    ap.add_argument("--gaussians", type=int, default=100_000)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--prior-device", default=None)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pdev = torch.device(a.prior_device) if a.prior_device else dev

    t0 = time.perf_counter()
    vae = {"preset": {"tiny": "tiny"}.get(a.preset, "wan2.2" if a.preset == "5b" else "wan2.1")}
    grid = GridDiffusion(
        transformer={"preset": a.preset},
        vae=vae,
        coupling=ProjectionGrid(t_max=2 * ((a.frames - 1) // (2 if a.preset == "tiny" else 4) + 1)),
        base_dtype="bfloat16" if pdev.type == "cuda" else "float32",
        lpips_net=None,
    ).to(pdev)
    grid.configure_model()
    dim, length = TEXT.get(a.preset, (4096, 512))
    dtype = "bfloat16" if pdev.type == "cuda" else "float32"
    prior = GridPrior.from_module(grid, text_encoder=HashTextEncoder(dim, length), dtype=dtype)
    build_s = time.perf_counter() - t0

    cfg = SyntheticConfig(num_views=a.views, num_frames=a.frames, height=a.height, width=a.width)
    K, w2c = make_cameras(cfg)
    times = torch.linspace(0, 1, a.frames)
    info = SceneInfo(K, w2c, times, a.height, a.width, list(range(a.views)), [], None, None, 24.0)
    g = torch.Generator().manual_seed(0)
    src = SourceClip(
        rgb=torch.rand(a.frames, 3, a.height, a.width, generator=g),
        depth=3.0 + torch.rand(a.frames, a.height, a.width, generator=g),
        K=K[0],
        w2c=w2c[0],
        times=times,
        view=0,
        caption="a benchmark scene",
        rig=w2c[:, 0],
    )
    fmd = FlowMatchingDistillation(prior, weight=0.1, guidance_scale=a.guidance, prior_device=a.prior_device)
    fmd.setup(src)
    fitter = Gaussian4DFitter(
        coarse_steps=0,
        lpips_net=None,
        init_random_points=a.gaussians,
        init_random_depth=(2.0, 6.0),
        deformation=DeformationField(),
        regularizers=[fmd],
    ).to(dev)
    fitter._trainer = None
    fitter.info = info
    fitter._init_splats(info)
    fitter.to(dev)
    fitter.trained_steps.fill_(1)

    rows = []
    for step in range(a.steps + 1):  # step 0 warms up (prior set-up, gsplat and cuDNN kernels)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            if pdev != dev:
                torch.cuda.reset_peak_memory_stats(pdev)
        fitter.zero_grad(set_to_none=True)
        sync(dev, pdev)
        t = time.perf_counter()
        render = fitter._render_novel_view(None)
        render.step = step
        sync(dev, pdev)
        t_render = time.perf_counter()
        loss = fmd(render)
        sync(dev, pdev)
        t_fmd = time.perf_counter()
        (fmd.weight * loss).backward()
        sync(dev, pdev)
        t_bwd = time.perf_counter()
        peak = {str(d): torch.cuda.max_memory_allocated(d) / 2**30 for d in {dev, pdev} if d.type == "cuda"}
        rows.append(
            {
                "step": step,
                "render_s": t_render - t,
                "fmd_forward_s": t_fmd - t_render,
                "backward_s": t_bwd - t_fmd,
                "total_s": t_bwd - t,
                "peak_gib": peak,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    steady = rows[1:] or rows
    mean = {
        k: sum(r[k] for r in steady) / len(steady)
        for k in ("render_s", "fmd_forward_s", "backward_s", "total_s")
    }
    print(
        json.dumps(
            {
                "preset": a.preset,
                "frames": a.frames,
                "size": [a.height, a.width],
                "grid_views": 2,
                "scene_views": a.views,
                "gaussians": a.gaussians,
                "cfg": a.guidance,
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "prior_device": str(pdev),
                "build_s": build_s,
                **{f"mean_{k}": v for k, v in mean.items()},
                "peak_gib": steady[-1]["peak_gib"],
            }
        )
    )


if __name__ == "__main__":
    main()
