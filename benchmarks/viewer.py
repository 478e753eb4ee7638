"""The viewer's costs: the live viewer's overhead on a fit, and a 120k-Gaussian frame.

``overhead``: a tiny CPU fit with and without :class:`~fourdgen.callbacks.viewer.LiveViewer`
(nobody connected), alternated ``--repeats`` times; prints the median wall time of each and the ratio.
``frame``: at ``--gaussians`` Gaussians, the time to turn a frame into what the browser draws
(covariances + viser's buffer, the message size), against one server render of it with the
project's rasterizer at ``--size`` (what streaming server renders would cost per camera move).

    python benchmarks/viewer.py overhead --steps 300 --repeats 6 --threads 1
    python benchmarks/viewer.py frame --gaussians 120000 --size 1280 720
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
import viser

from fourdgen.callbacks.viewer import LiveViewer
from fourdgen.data.scene_frames import SceneFramesDataModule
from fourdgen.data.synthetic import SyntheticConfig
from fourdgen.gaussians.container import Gaussians
from fourdgen.gaussians.deformation import DeformationField
from fourdgen.gaussians.densify import BudgetStrategy
from fourdgen.gaussians.optim import LearningRates
from fourdgen.gaussians.rasterize import rasterize
from fourdgen.geometry.cameras import intrinsics_from_fov, look_at
from fourdgen.stages.fit import Gaussian4DFitter
from fourdgen.viewer.splats import viser_splats

SCENE = SyntheticConfig(num_views=4, num_frames=6, height=24, width=32, layout="arc", arc_degrees=50, seed=5)


class StepClock(L.Callback):
    """Wall time of the training steps after ``warmup`` (the fit itself, not its set-up)."""

    def __init__(self, warmup: int = 20):
        self.warmup, self.start, self.seconds, self.cpu = warmup, None, 0.0, 0.0

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            self.start, self.cpu0 = time.perf_counter(), time.process_time()

    def on_train_end(self, trainer, *args) -> None:
        # process CPU time counts every thread, the viewer's too, and less of the other processes
        self.seconds, self.cpu = time.perf_counter() - self.start, time.process_time() - self.cpu0


def fit_seconds(root: str, steps: int, live: bool) -> tuple[float, float, float]:
    """Wall time of the whole ``trainer.fit``, wall and process CPU time of its steps after the
    warm-up, for a tiny CPU fit."""
    model = Gaussian4DFitter(
        coarse_steps=steps // 4,
        init_opacity=0.3,
        lpips_net=None,
        path_samples=8,
        deformation=DeformationField(features=8, resolution=(32, 32, 32, 6), multires=(1,), width=32),
        densify=BudgetStrategy(refine_start_iter=40, refine_every=40, max_gaussians=4000, prune_to=0),
        lr=LearningRates(max_steps=steps),
    )
    dm = SceneFramesDataModule(scene=f"{root}/scene", synthetic=SCENE, holdout_views=[2], init_points=2500)
    clock = StepClock()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=[clock] + ([LiveViewer(port=0)] if live else []),
    )
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    return time.perf_counter() - t0, clock.seconds, clock.cpu


def overhead(steps: int, repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as root:
        fit_seconds(root, 40, False)  # writes the scene, warms up
        runs = {False: [], True: []}
        for i in range(2 * repeats):  # ABBA order: a slow spell of the machine hits both
            live = i % 4 in (1, 2)
            runs[live].append(fit_seconds(root, steps, live))
    print(f"{steps} steps, {repeats} fits each (alternated), torch threads {torch.get_num_threads()}")
    warm = StepClock().warmup
    whats = ("whole fit, wall (with set-up)", f"steps {warm}..{steps}, wall", f"steps {warm}..{steps}, CPU")
    for j, what in enumerate(whats):
        off = statistics.median(r[j] for r in runs[False])
        on = statistics.median(r[j] for r in runs[True])
        print(f"{what}: without {off:.2f} s, with LiveViewer (nobody connected) {on:.2f} s")
        print(f"  ratio {on / off:.3f}")
        for live in (False, True):
            print(f"  {'with' if live else 'without'}: " + ", ".join(f"{r[j]:.2f}" for r in runs[live]))


def frame(n: int, size: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    gauss = Gaussians(
        means=torch.randn(n, 3, generator=g),
        log_scales=torch.full((n, 3), -4.0) + 0.3 * torch.randn(n, 3, generator=g),
        quats=torch.randn(n, 4, generator=g),
        opacity_logits=torch.randn(n, generator=g),
        sh0=torch.randn(n, 1, 3, generator=g),
        shN=torch.zeros(n, 0, 3),
    )
    server = viser.ViserServer(host="127.0.0.1", port=0, verbose=False)
    handle = server.scene.add_gaussian_splats("/g", **viser_splats(gauss))
    t0 = time.perf_counter()
    handle.set_gaussians(**viser_splats(gauss))  # what a time step costs the viewer's server
    prep = time.perf_counter() - t0
    nbytes = handle.buffer.nbytes
    server.stop()
    W, H = size
    K = intrinsics_from_fov(60.0, W, H)
    w2c = look_at(torch.tensor([0.0, 0.0, -4.0]), torch.zeros(3))
    rasterize(gauss, K[None], w2c[None], W, H, render_depth=False)  # warm-up
    t0 = time.perf_counter()
    out = rasterize(gauss, K[None], w2c[None], W, H, render_depth=False)
    render = time.perf_counter() - t0
    mib = nbytes / 2**20
    print(f"{n} Gaussians: a new frame for the browser in {prep * 1e3:.0f} ms, {mib:.1f} MiB to send")
    where = f"{out.rgb.device}, torch {torch.get_num_threads()} threads"
    print(f"server render {W}x{H} ({where}): {render * 1e3:.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("overhead", "frame"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the quickstart uses 1)")
    p.add_argument("--gaussians", type=int, default=120_000)
    p.add_argument("--size", type=int, nargs=2, default=(1280, 720))
    a = p.parse_args()
    if a.what == "overhead":
        overhead(a.steps, a.repeats, a.threads)
    else:
        frame(a.gaussians, tuple(a.size))


if __name__ == "__main__":
    main()
