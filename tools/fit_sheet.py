"""Contact sheet of a fitted 4D Gaussian scene: held-out renders over ground truth, fly-through frames.

    python tools/fit_sheet.py outputs/quickstart docs/quickstart_sheet.png

Reads ``<run>/checkpoints/last.ckpt`` and ``<run>/scene/flythrough.mp4`` (what the quickstart
writes) and the scene the run was fitted to (from the checkpoint's DataModule hyper-parameters).
Rows: the held-out view rendered at evenly spaced times, its ground truth, then fly-through frames.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import imageio.v3 as iio
import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from fourdgen.cli import FourDGenCLI
from fourdgen.io import atomic_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the run's output folder (holds checkpoints/ and scene/)")
    ap.add_argument("out", help="PNG to write")
    ap.add_argument("--config", default="lightning_configs/quickstart.yaml")
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscaling of small renders")
    a = ap.parse_args()
    sys.argv = sys.argv[:1]  # the CLI below gets its arguments explicitly, not this tool's
    run = Path(a.run)
    cli = FourDGenCLI(args=[f"--config={a.config}", "--trainer.logger=false"], run=False)
    model, dm = cli.model, cli.datamodule
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    dm.prepare_data()
    dm.setup("test")
    model.info = dm.scene_info()
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"], strict=False)
    model.eval()
    batch = next(iter(dm.test_dataloader()))  # the first held-out view at every time
    T = batch.rgb.shape[0]
    idx = torch.linspace(0, T - 1, a.frames).round().long().tolist()
    with torch.no_grad():
        pred = [
            model.render(batch.times[i, 0], batch.K[i, :1], batch.w2c[i, 0, :1]).rgb[0].permute(2, 0, 1)
            for i in idx
        ]
    gt = [(batch.rgb[i, 0, 0] + 1) / 2 for i in idx]
    fly = iio.imread(run / "scene" / "flythrough.mp4")  # [N, H, W, 3] uint8
    pick = torch.linspace(0, len(fly) - 1, a.frames).round().long().tolist()
    fly = [torch.from_numpy(fly[j]).permute(2, 0, 1).float() / 255 for j in pick]
    rows = torch.stack([*pred, *gt, *fly]).clamp(0, 1)
    rows = F.interpolate(rows, scale_factor=a.scale, mode="nearest")
    with atomic_path(a.out) as tmp:
        save_image(rows, tmp, nrow=a.frames, padding=2, format="png")


if __name__ == "__main__":
    main()
