"""Held-out quality of a 4D Gaussian fit, deformation on vs off, through the fourdgen CLI.

Fits a recipe twice (``deform: true`` and ``false``) on the same synthetic scene and prints the
held-out view's PSNR/SSIM/LPIPS, PSNR on the moving objects only, time per step and Gaussians;
and where the error is: PSNR on the training views (all, static, moving) and on the held-out
view's pixels that some training camera sees (``covered``: its exact xyz projected into the
training cameras, occlusion-tested; :func:`fourdgen.geometry.visibility.covered_pixels`) or none.

    python benchmarks/fit_quality.py --config lightning_configs/quickstart.yaml
    python benchmarks/fit_quality.py --config lightning_configs/fit/full4d.yaml --steps 5000 --coarse 1000 \
        --views 7 --frames 16 --size 256 --holdout 3 --no-export

Extra ``--set key=value`` pairs are passed to the CLI as ``--key=value``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from fourdgen.batch import GridBatch
from fourdgen.cli import FourDGenCLI
from fourdgen.data.scene import read_scene
from fourdgen.data.synthetic import MARKER, SyntheticConfig, make_objects, render_view
from fourdgen.geometry.visibility import covered_pixels
from fourdgen.metrics.image import pooled_psnr


def run(args: argparse.Namespace, deform: bool, workdir: str) -> dict:
    cli_args = [
        f"--config={args.config}",
        f"--model.init_args.deform={str(deform).lower()}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={workdir}",
    ]
    if args.steps:
        cli_args += [
            f"--trainer.max_steps={args.steps}",
            f"--model.init_args.lr.max_steps={args.steps}",
            f"--model.init_args.densify.refine_stop_iter={int(args.steps * 0.8)}",
        ]
    if args.coarse is not None:
        cli_args.append(f"--model.init_args.coarse_steps={args.coarse}")
    if args.views:
        synth = {
            "num_views": args.views,
            "num_frames": args.frames,
            "height": args.size,
            "width": args.size,
            "layout": "orbit",
            "elevation_deg": 25,
            "seed": args.seed,
            "motion_scale": args.motion_scale,
        }
        cli_args += [
            f"--data.init_args.scene={args.scene_dir}",
            f"--data.init_args.synthetic={json.dumps(synth)}",
            f"--data.init_args.holdout_views=[{args.holdout}]",
            "--data.init_args.depth_model=null",  # the synthetic scene has exact depth
            "--model.init_args.regularizers=[]",  # FMD needs real Wan weights (--set to put it back)
        ]
    if args.no_export:
        cli_args += ["--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"]
    cli_args += [f"--{kv}" for kv in args.set]
    cli = FourDGenCLI(args=cli_args, run=False)
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - t0
    # Lightning's teardown leaves the model on the CPU after fit and test: the evaluation below
    # would render with the CPU reference rasterizer (over 15 min for a 256 px clip on a GPU host).
    device = cli.trainer.strategy.root_device
    cli.model.to(device)
    name = "dynamic" if deform else "static"
    out = {
        "fit_s": fit_s,
        "ms_per_step": 1000 * fit_s / max(cli.trainer.global_step, 1),
        "gaussians": len(cli.model.splats["means"]),
    }
    # Each result printed as it comes (a run cut short by a time limit keeps what it measured).
    out.update(region_psnr(cli.model, cli.datamodule.root, cli.datamodule.hparams.holdout_views))
    print(f"fit_quality {name} regions: {json.dumps(out)}", flush=True)
    between = between_psnr(cli.model, cli.datamodule.root, cli.datamodule.hparams.holdout_views)
    print(f"fit_quality {name} between: {json.dumps(between)}", flush=True)
    out.update(between)
    metrics = cli.trainer.test(cli.model, cli.datamodule, verbose=False)[0]
    out.update({k.removeprefix("test/"): v for k, v in metrics.items()})
    cli.model.to(device)
    out["alpha"] = held_out_renders(cli.model, cli.datamodule, args.save_renders, name)
    return out


@torch.no_grad()
def region_psnr(model, scene_dir, holdout: list[int]) -> dict[str, float]:
    """PSNR by region (a fit at the scene's own size): training views (all / static / moving pixels)
    and held-out views (pixels covered by a training camera / not covered; moving pixels)."""
    s = read_scene(scene_dir)
    V, T, dev = s.num_views, s.num_frames, model.device
    times = torch.linspace(0, 1, T) if T > 1 else torch.zeros(1)
    train = [v for v in range(V) if v not in holdout]

    def render(v):
        outs = [model.render(times[t], s.K[v : v + 1].to(dev), s.w2c[v, t : t + 1].to(dev)) for t in range(T)]
        return torch.stack([o.rgb[0] for o in outs]).clamp(0, 1).cpu()

    def psnr(pred, gt, mask=None):
        if mask is not None and not mask.any():
            return float("nan")
        return float(pooled_psnr(pred, gt, mask=None if mask is None else mask[..., None].expand_as(gt)))

    def gt(v):
        return s.load_rgb(v).permute(0, 2, 3, 1)

    def moving(v):
        m = s.load_mask(v)
        return None if m is None else m > 0

    out = {}
    pred, ref = torch.cat([render(v) for v in train]), torch.cat([gt(v) for v in train])
    out["train_psnr"] = psnr(pred, ref)
    if all(moving(v) is not None for v in train):
        mv = torch.cat([moving(v) for v in train])
        out["train_static"], out["train_moving"] = psnr(pred, ref, ~mv), psnr(pred, ref, mv)
    if s.has_depth and all(s.views[v].xyz is not None for v in holdout):
        depth = torch.stack([s.load_depth(v) for v in train])
        pred = torch.cat([render(v) for v in holdout])
        ref = torch.cat([gt(v) for v in holdout])
        cov = torch.cat([covered_pixels(s.load_xyz(v), s.K[train], s.w2c[train], depth) for v in holdout])
        out["heldout_covered"], out["heldout_uncovered"] = psnr(pred, ref, cov), psnr(pred, ref, ~cov)
        out["covered_share"] = float(cov.float().mean())
        out.update(surface_psnr(pred, ref, cov, s, holdout, psnr))
    return out


@torch.no_grad()
def between_psnr(model, scene_dir, holdout: list[int]) -> dict[str, float]:
    """PSNR of the training views halfway between their captured times (what a fly-through shows
    between frames), all pixels and moving ones, against the synthetic scene ray-cast at those
    times; empty for a scene fourdgen did not generate."""
    marker = Path(scene_dir) / MARKER
    if not marker.is_file():
        return {}
    fields = SyntheticConfig.__dataclass_fields__
    cfg = SyntheticConfig(**{k: v for k, v in json.loads(marker.read_text()).items() if k in fields})
    if cfg.num_frames < 2:
        return {}
    s, objects, dev = read_scene(scene_dir), make_objects(cfg), model.device
    times = torch.linspace(0, 1, cfg.num_frames)
    mid = (times[:-1] + times[1:]) / 2
    preds, refs, moving = [], [], []
    for v in (v for v in range(s.num_views) if v not in holdout):
        w2c = s.w2c[v, :-1]  # the camera at the frame before (static rigs: the same)
        # Ray-cast where the model is: on the CPU a 256 px clip takes minutes (several fits sharing
        # a GPU host's cores: far longer), on a GPU seconds.
        rgb, _, _, mask = render_view(objects, s.K[v], w2c, mid, cfg.height, cfg.width, cfg.supersample, dev)
        preds += [model.render(t, s.K[v : v + 1].to(dev), w2c[i : i + 1].to(dev)).rgb[0].clamp(0, 1).cpu()
                  for i, t in enumerate(mid)]  # fmt: skip
        refs.append(rgb)
        moving.append(mask > 0)
    pred, ref, mv = torch.stack(preds), torch.cat(refs), torch.cat(moving)[..., None].expand(-1, -1, -1, 3)
    return {
        "between_psnr": float(pooled_psnr(pred, ref)),
        "between_moving": float(pooled_psnr(pred, ref, mask=mv)) if mv.any() else float("nan"),
    }


def surface_psnr(pred, ref, cov, s, holdout: list[int], psnr) -> dict[str, float]:
    """Covered held-out PSNR by surface of the synthetic scene (its exact xyz: the dome of radius 12,
    the floor at y = -1, the objects by mask) and by distance (z-depth below / above 6 units, where
    the floor's checker squares shrink to a few pixels)."""
    xyz = torch.cat([s.load_xyz(v) for v in holdout])  # [T, H, W, 3]
    depth = torch.cat([s.load_depth(v) for v in holdout])
    masks = [s.load_mask(v) for v in holdout]
    dome = xyz.norm(dim=-1) > 11.5
    obj = torch.cat(masks) > 0 if all(m is not None for m in masks) else torch.zeros_like(dome)
    floor = (xyz[..., 1] < -0.99) & ~dome & ~obj
    rest = ~dome & ~floor & ~obj  # static objects' surfaces, if any
    out = {
        f"cov_{k}": psnr(pred, ref, cov & m) for k, m in (("dome", dome), ("floor", floor), ("objects", obj))
    }
    out["cov_other"] = psnr(pred, ref, cov & rest)
    out["cov_near"], out["cov_far"] = psnr(pred, ref, cov & (depth < 6)), psnr(pred, ref, cov & (depth >= 6))
    return out


@torch.no_grad()
def held_out_renders(model, datamodule, out_dir: str | None, name: str) -> float:
    """Mean alpha of the held-out renders (1: opaque everywhere); with ``out_dir``, writes
    ``<name>_heldout.png``: rows of render | ground truth | alpha | 4 x absolute error for a few
    frames."""
    model.eval()
    alphas, rows = [], []
    for batch in datamodule.test_dataloader():
        batch = GridBatch.coerce(batch).to(model.device)
        for i in range(batch.rgb.shape[0]):
            out = model.render(batch.times[i, 0], batch.K[i, :1], batch.w2c[i, 0, :1], deform=None)
            alphas.append(out.alpha.mean().item())
            if len(rows) < 16:
                pred = out.rgb[0].permute(2, 0, 1).clamp(0, 1)
                gt = (batch.rgb[i, 0, 0] + 1) / 2
                alpha = out.alpha[0].permute(2, 0, 1).expand_as(pred)
                rows += [pred, gt, alpha, ((pred - gt).abs() * 4).clamp(0, 1)]
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_image(torch.stack(rows).float().cpu(), f"{out_dir}/{name}_heldout.png", nrow=4)
    return sum(alphas) / max(len(alphas), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=0, help="override trainer.max_steps (0: recipe's)")
    p.add_argument("--coarse", type=int, default=None)
    p.add_argument(
        "--views", type=int, default=0, help="synthetic orbit scene with this many views (0: recipe's)"
    )
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--holdout", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--motion-scale", type=float, default=1.0, help="0: the same scene without motion")
    p.add_argument("--scene-dir", default=None)
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--only", choices=["dynamic", "static"], default=None)
    p.add_argument("--save-renders", default=None, help="folder for held-out render | gt | alpha images")
    p.add_argument("--set", nargs="*", default=[], help="extra CLI overrides key=value")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.scene_dir = args.scene_dir or f"{tmp}/scene"
        rows = {}
        for name, deform in (("dynamic", True), ("static", False)):
            if args.only in (None, name):
                rows[name] = run(args, deform, f"{tmp}/{name}")
    keys = ["psnr", "psnr_dynamic", "ssim", "lpips", "alpha", "gaussians", "ms_per_step", "fit_s"]
    keys += [
        "train_psnr",
        "train_static",
        "train_moving",
        "heldout_covered",
        "heldout_uncovered",
        "covered_share",
        "cov_dome",
        "cov_floor",
        "cov_objects",
        "cov_other",
        "cov_near",
        "cov_far",
        "between_psnr",
        "between_moving",
    ]
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nheld-out view, {args.config}, device {dev}")
    print("| fit | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in keys) + " |")


if __name__ == "__main__":
    main()
