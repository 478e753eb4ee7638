"""Does a learned prior help? Train a small Full-4D grid model, then fit an unseen scene with and without FMD.

1. ``lightning_configs/tiny/full4d.yaml`` (the tiny grid model: ProjectionGrid, random-init Wan
   layout) trains for ``--prior-steps`` on ``--scenes`` synthetic multi-view scenes through the CLI.
2. An unseen synthetic scene of the same family (another seed) is fitted by the 4DGS fitter, view
   ``--holdout`` held out, once without and once with FMD from that checkpoint.
3. Reported per fit: training-view PSNR, held-out PSNR on the pixels some training camera sees and
   on those none sees (:func:`fourdgen.geometry.visibility.covered_pixels`), the held-out view's
   mean alpha; and for the prior itself, the PSNR of its own sample of the held-out view.

    python benchmarks/fmd_quality.py --prior-steps 3000 --fit-steps 1500
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from fourdgen.backbones.text import HashTextEncoder
from fourdgen.cli import FourDGenCLI
from fourdgen.data.scene_frames import SceneFramesDataModule
from fourdgen.data.synthetic import SyntheticConfig, make_scene
from fourdgen.gaussians.deformation import DeformationField
from fourdgen.gaussians.densify import BudgetStrategy
from fourdgen.gaussians.fmd import FlowMatchingDistillation
from fourdgen.gaussians.optim import LearningRates
from fourdgen.geometry.visibility import covered_pixels
from fourdgen.metrics.image import pooled_psnr
from fourdgen.stages.fit import Gaussian4DFitter
from fourdgen.stages.grid_prior import GridPrior

ROOT = Path(__file__).resolve().parents[1]


def train_prior(work: Path, steps: int, scenes: int, accelerator: str) -> Path:
    ck = work / "prior"
    FourDGenCLI(
        args=[
            "fit",
            f"--config={ROOT / 'lightning_configs/tiny/full4d.yaml'}",
            f"--data.init_args.root={work / 'multiview'}",
            f"--data.init_args.num_synthetic_scenes={scenes}",
            f"--trainer.accelerator={accelerator}",
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={work}",
            "--trainer.callbacks="
            + json.dumps(
                [
                    {
                        "class_path": "fourdgen.callbacks.checkpoint.ModelCheckpoint",
                        "init_args": {"dirpath": str(ck), "save_last": True},
                    }
                ]
            ),
        ]
    )
    return ck / "last.ckpt"


def prior_sample_psnr(prior: GridPrior, scene, holdout: int) -> float:
    """PSNR of the grid model's own sample of the held-out view (how much the prior knows)."""
    m = prior.model
    b = prior.batch(scene.K[holdout], scene.w2c[holdout])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = m.sample(b, num_steps=20, guidance_scale=1.0, generator=g)
        rgb = m.decode_grid(x, 2)[0, 1]  # [T, 3, H, W] in [-1, 1]
    pred = ((rgb.float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    return float(pooled_psnr(pred, scene.rgb[holdout]))


def fit(
    work: Path, cfg: SyntheticConfig, holdout: int, steps: int, fmd: FlowMatchingDistillation | None, accel
):
    torch.manual_seed(0)
    dm = SceneFramesDataModule(
        scene=str(work / "unseen"),
        synthetic=cfg,
        holdout_views=[holdout],
        init_points=3000,
        init_frames="all",
    )
    model = Gaussian4DFitter(
        coarse_steps=steps // 4,
        init_opacity=0.3,
        lpips_net=None,
        path_samples=120,
        deformation=DeformationField(features=8, resolution=(16, 16, 16, 4), multires=(1,), width=32),
        densify=BudgetStrategy(
            refine_start_iter=100, refine_every=100, refine_stop_iter=int(0.8 * steps), max_gaussians=8000
        ),
        lr=LearningRates(max_steps=steps),
        regularizers=[fmd] if fmd else [],
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator=accel,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    L.seed_everything(0)
    t = time.perf_counter()
    trainer.fit(model, dm)
    # Lightning's teardown leaves the model on the CPU: evaluate it where it trained.
    return model.to(trainer.strategy.root_device), time.perf_counter() - t


@torch.no_grad()
def evaluate(model: Gaussian4DFitter, scene, holdout: int) -> dict[str, float]:
    V, T = scene.rgb.shape[:2]
    dev = model.device

    def render(v):
        outs = [
            model.render(scene.times[t], scene.K[v : v + 1].to(dev), scene.w2c[v, t : t + 1].to(dev))
            for t in range(T)
        ]
        return torch.stack([o.rgb[0] for o in outs]).clamp(0, 1).cpu(), torch.stack(
            [o.alpha[0] for o in outs]
        ).cpu()

    train = [v for v in range(V) if v != holdout]
    train_psnr = sum(float(pooled_psnr(render(v)[0], scene.rgb[v])) for v in train) / len(train)
    pred, alpha = render(holdout)
    gt = scene.rgb[holdout]
    seen = covered_pixels(scene.xyz[holdout], scene.K[train], scene.w2c[train], scene.depth[train])
    m = seen[..., None].expand_as(gt)
    return {
        "train_psnr": train_psnr,
        "heldout_psnr": float(pooled_psnr(pred, gt)),
        "heldout_seen_psnr": float(pooled_psnr(pred, gt, mask=m)),
        "heldout_unseen_psnr": float(pooled_psnr(pred, gt, mask=~m)),
        "unseen_share": float((~seen).float().mean()),
        "heldout_mean_alpha": float(alpha.mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior-steps", type=int, default=3000)
    ap.add_argument("--scenes", type=int, default=32)
    ap.add_argument("--fit-steps", type=int, default=1500)
    ap.add_argument("--weights", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--holdout", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    accel = "gpu" if torch.cuda.is_available() else "cpu"
    work = Path(a.workdir or tempfile.mkdtemp(prefix="fmd_quality_"))
    t = time.perf_counter()
    ckpt = train_prior(work, a.prior_steps, a.scenes, accel)
    prior_s = time.perf_counter() - t
    # the family of the prior's training scenes (tiny/full4d.yaml), a seed it never saw
    cfg = SyntheticConfig(num_views=4, num_frames=5, height=32, width=32, layout="arc", seed=1234)
    scene = make_scene(cfg)
    prior = GridPrior(checkpoint=str(ckpt), text_encoder=HashTextEncoder(32, 8), dtype="float32")
    rows = {"prior_train_s": prior_s}
    base, secs = fit(work, cfg, a.holdout, a.fit_steps, None, accel)
    rows["no_fmd"] = {**evaluate(base, scene, a.holdout), "fit_s": secs}
    print(json.dumps(rows), flush=True)
    for w in a.weights:
        fmd = FlowMatchingDistillation(
            prior, weight=w, start_step=a.fit_steps // 4, guidance_scale=1.0, source_view=0
        )
        model, secs = fit(work, cfg, a.holdout, a.fit_steps, fmd, accel)
        rows[f"fmd_w{w}"] = {**evaluate(model, scene, a.holdout), "fit_s": secs}
        if "prior_sample_psnr" not in rows:
            rows["prior_sample_psnr"] = prior_sample_psnr(prior, scene, a.holdout)
        print(json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
