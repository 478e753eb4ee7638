"""Time fourdgen's rasterizer backends: gsplat (CUDA) and the pure-torch backend on the same device.

    python benchmarks/rasterize.py                      # CUDA if available, else CPU
    python benchmarks/rasterize.py --device cpu --sizes 5000x96x96 --threads 2

Prints, per scene size and backend, the median time of forward (no grad) and forward+backward,
and the max |difference| of rgb/alpha to the first backend (gsplat on CUDA).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fourdgen.gaussians import Gaussians, rasterize
from fourdgen.geometry.cameras import intrinsics_from_fov, look_at


def make_scene(n: int, width: int, height: int, cameras: int, sh_degree: int, device: str, seed: int = 0):
    """Gaussians on a unit sphere's surface (a typical object fit: splats about their spacing)."""
    gen = torch.Generator().manual_seed(seed)
    xyz = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    g = Gaussians.from_points(xyz, torch.rand(n, 3, generator=gen), sh_degree=sh_degree, init_opacity=0.5)
    angles = torch.linspace(0, 2 * torch.pi, cameras + 1)[:-1]
    eyes = torch.stack([3 * torch.sin(angles), -0.5 * torch.ones_like(angles), -3 * torch.cos(angles)], -1)
    w2c = look_at(eyes, torch.zeros(cameras, 3))
    K = intrinsics_from_fov(50.0, width, height).expand(cameras, 3, 3)
    return g.to(device), K.to(device), w2c.to(device)


def timeit(fn, device: str, warmup: int, repeats: int) -> float:
    """Median wall time in ms (CUDA synchronised around each run)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench(args, n: int, width: int, height: int, backends: list[str]) -> list[tuple]:
    g, K, w2c = make_scene(n, width, height, args.cameras, args.sh_degree, args.device)
    params = {k: v.clone().requires_grad_(True) for k, v in g.as_dict().items()}
    bg = torch.ones(3, device=args.device)

    def fwd(backend):
        with torch.no_grad():
            return rasterize(params, K, w2c, width, height, backend=backend, background=bg)

    def fwd_bwd(backend):
        out = rasterize(params, K, w2c, width, height, backend=backend, background=bg)
        (out.rgb.sum() + out.depth.mean()).backward()

    rows, first = [], None
    for b in backends:
        t_f = timeit(lambda b=b: fwd(b), args.device, args.warmup, args.repeats)
        t_fb = timeit(lambda b=b: fwd_bwd(b), args.device, args.warmup, args.repeats)
        out = fwd(b)
        if first is None:
            first, diff = out, "-"
        else:
            d_rgb = (out.rgb - first.rgb).abs().max().item()
            d_alpha = (out.alpha - first.alpha).abs().max().item()
            diff = f"{d_rgb:.1e} / {d_alpha:.1e}"
        visible = int((out.info["radii"] > 0).all(-1).sum())
        rows.append(
            (f"{n}", f"{width}x{height}x{args.cameras}", b, f"{visible}", f"{t_f:.2f}", f"{t_fb:.2f}", diff)
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes",
        default=None,
        help="comma-separated NxWxH (default: GPU 1000x256x256,10000x256x256,50000x1280x720,"
        "200000x1280x720; CPU 1000x64x64,5000x96x96,5000x128x128)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--backends", default=None, help="comma-separated (default: gsplat,torch on CUDA, torch on CPU)"
    )
    p.add_argument("--cameras", type=int, default=1)
    p.add_argument("--sh-degree", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sizes = args.sizes or (
        "1000x256x256,10000x256x256,50000x1280x720,200000x1280x720"
        if cuda
        else "1000x64x64,5000x96x96,5000x128x128"
    )
    backends = (args.backends or ("gsplat,torch" if cuda else "torch")).split(",")
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; median of {args.repeats} after {args.warmup} warm-up")
    head = ("N", "WxHxC", "backend", "visible", "fwd ms", "fwd+bwd ms", "max|d| rgb/alpha")
    rows = []
    for s in sizes.split(","):
        n, w, h = (int(v) for v in s.lower().split("x"))
        rows += bench(args, n, w, h, backends)
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(v).rjust(wd) for v, wd in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
