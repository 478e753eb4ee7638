"""Quality of the warp's target: a held-out view predicted from its two neighbouring training views.

On the synthetic 7-view orbit (view 3 held out), views 2 and 4 are warped into view 3
(:func:`fourdgen.geometry.warp.backward_warp`) through view 3's exact depth, and through the depth
the two neighbours' depth maps give it (:func:`~fourdgen.geometry.warp.forward_depth`, the nearer of
the two), with and without its see-through test. Prints the PSNR of the prediction on the pixels
that have one and their share of the view, the share of the splatted depth within 1% of the exact
one, and the splat's time. This is the target :class:`~fourdgen.gaussians.regularizers.WarpConsistency`
fits a novel view to (``depth="views"``).

    python benchmarks/warp_target.py --sizes 48 128 256
"""

from __future__ import annotations

import argparse
import time

import torch

from fourdgen.data.synthetic import SyntheticConfig, make_scene
from fourdgen.geometry.warp import backward_warp, forward_depth


def predict(scene, depth: torch.Tensor, views=(2, 4), target=3) -> tuple[float, float]:
    """PSNR of the views' colours warped into ``target`` through ``depth [T, H, W]``, and its share."""
    acc, count = 0, 0
    for v in views:
        rgb, ok = backward_warp(
            depth, scene.K[target], scene.w2c[target], scene.rgb[v].permute(0, 3, 1, 2), scene.depth[v],
            scene.K[v], scene.w2c[v],
        )  # fmt: skip
        acc, count = acc + rgb, count + ok
    m = count > 0
    gt = scene.rgb[target].permute(0, 3, 1, 2)
    mse = (acc / count.clamp_min(1)[:, None] - gt).pow(2).mean(1)[m].mean()
    return float(-10 * torch.log10(mse)), float(m.float().mean())


def splat(scene, size: int, occlusion_tol, views=(2, 4), target=3) -> tuple[torch.Tensor, float]:
    """The nearer of the views' splatted depths in ``target`` and the seconds the splats took."""
    t0 = time.perf_counter()
    K, w2c = scene.K[target], scene.w2c[target]
    z = torch.stack([
        forward_depth(scene.depth[v], scene.K[v], scene.w2c[v], K, w2c, size, size, occlusion_tol)
        for v in views
    ])  # fmt: skip
    seconds = time.perf_counter() - t0
    z = torch.where(z > 0, z, torch.inf).amin(0)
    return torch.where(z.isfinite(), z, 0.0), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[48, 128, 256])
    p.add_argument("--frames", type=int, default=2)
    args = p.parse_args()
    print("| size | depth | PSNR | share | depth within 1% | splat ms |\n|---|---|---|---|---|---|")
    for size in args.sizes:
        cfg = SyntheticConfig(
            num_views=7, num_frames=args.frames, height=size, width=size, layout="orbit", elevation_deg=25
        )
        scene = make_scene(cfg, device="cpu")
        psnr, share = predict(scene, scene.depth[3])
        print(f"| {size} | exact | {psnr:.2f} | {share:.3f} | - | - |")
        for name, tol in (("splatted", 0.05), ("splatted, no see-through test", None)):
            z, seconds = splat(scene, size, tol)
            psnr, share = predict(scene, z)
            hit, exact = z > 0, scene.depth[3]
            close = float((((z - exact).abs() <= 0.01 * exact) & hit).sum() / hit.sum().clamp_min(1))
            print(f"| {size} | {name} | {psnr:.2f} | {share:.3f} | {close:.3f} | {1000 * seconds:.0f} |")


if __name__ == "__main__":
    main()
