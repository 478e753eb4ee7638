"""Training speed and peak memory of the 4D Gaussian fitter at fixed Gaussian counts.

Runs the Full-4D recipe through the fourdgen CLI on a synthetic orbit scene with densification off,
so the number of Gaussians stays at ``--points`` (initialised from the scene's depth), and times
training steps after a warm-up. ``dynamic`` is the fine stage (deformation on from step 0),
``static`` is the coarse stage, ``dynamic-compiled`` the fine stage with ``compile: true``.
Prints iterations/s and peak GPU memory.

    python benchmarks/fit_speed.py --points 120000 1000000 --size 512
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
import traceback
import warnings

import lightning as L
import torch

from fourdgen.cli import FourDGenCLI


class StepTimer(L.Callback):
    """Mean wall time of the training steps after ``warmup``: synchronised once at the window's start
    and once at its end, so the host runs ahead of the GPU as in a real fit (a sync around every
    step would serialise them, adding the host's launch time to the GPU's)."""

    def __init__(self, warmup: int, profile: bool = False, end: int | None = None):
        self.warmup, self.steps, self.seconds, self._t0 = warmup, 0, 0.0, 0.0
        self.profiler = None
        # ``end``: the window ends before this step; the steps after it run in CUDA's sync debug
        # mode, which warns at every host sync: counted by call site (the stack walks cost host time)
        self.end = end if torch.cuda.is_available() else None
        self.syncs: collections.Counter = collections.Counter()
        self.sync_steps, self._warnings = 0, None
        if profile:
            acts = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            )
            self.profiler = torch.profiler.profile(
                activities=acts, schedule=torch.profiler.schedule(wait=0, warmup=1, active=5, repeat=1)
            )

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            if self.profiler is not None:
                self.profiler.start()
            self._sync()
            self._t0 = time.perf_counter()
        if self.end is not None and trainer.global_step == self.end:  # the window ends, syncs counted
            self._stop()
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._record
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.warmup < trainer.global_step <= (self.end or trainer.global_step):
            self.steps += 1
            if self.profiler is not None:
                self.profiler.step()
        elif self._warnings is not None:
            self.sync_steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if self._warnings is None:
            self._stop()
            return
        torch.cuda.set_sync_debug_mode(0)
        self._warnings.__exit__(None, None, None)
        self._warnings = None

    def _stop(self) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._t0

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        """A sync debug warning: counted by the call site's last frames in fourdgen, gsplat, Lightning."""
        stack = traceback.extract_stack()[:-2]
        frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in stack]
        ours = [f for f in frames if any(k in f for k in ("fourdgen", "gsplat", "lightning", "torch/"))]
        self.syncs["\n    ".join((ours or frames)[-6:])] += 1

    def sync_table(self) -> str:
        n = max(self.sync_steps, 1)
        total = sum(self.syncs.values())
        rows = [f"host syncs per step: {total / n:.1f} ({total} in {n} steps)"]
        rows += [f"  {c / n:.1f}/step at\n    {site}" for site, c in self.syncs.most_common()]
        return "\n".join(rows)

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / max(self.steps, 1)

    def table(self) -> str:
        self.profiler.stop()
        avg = self.profiler.key_averages()
        cuda = torch.cuda.is_available()
        keys = ["self_cuda_time_total", "cpu_time_total"] if cuda else ["self_cpu_time_total"]
        # by GPU time (what the kernels cost) and by host time (where a launch-bound step waits)
        runtime = (
            "cudaStreamSynchronize",
            "cudaDeviceSynchronize",
            "cudaMemcpyAsync",
            "cudaLaunchKernel",
            "cuLaunchKernel",
            "cudaGraphLaunch",
        )
        calls = {e.key: e.count for e in avg if e.key in runtime}
        steps = 5  # the schedule's active steps
        per_step = ", ".join(f"{k} {v / steps:.1f}" for k, v in calls.items())
        tables = [avg.table(sort_by=k, row_limit=15, max_name_column_width=60) for k in keys]
        return "\n".join([*tables, f"runtime calls per step: {per_step}"])


class HostTimes(L.Callback):
    """Host (wall) time per step spent in each part of the fitter's step, without syncs: on a
    launch-bound step the host's time is the step's time, and it says which code to cut. The parts
    nest (``training_step`` holds ``render``, which holds ``rasterize``); waits for the GPU show up
    where the host blocks (gsplat's intersection count, in ``rasterize``)."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.steps, self._marks = warmup, collections.Counter(), 0, {}
        self._patched: list[tuple] = []  # (owner, name, original), restored at teardown

    def _on(self) -> bool:
        return self._trainer.global_step >= self.warmup

    def _timed(self, fn, label: str):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if self._on():
                    self.times[label] += time.perf_counter() - t

        return timed

    def _wrap(self, owner, name: str, label: str | None = None) -> None:
        fn = getattr(owner, name)
        self._patched.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, self._timed(fn, label or name))

    def setup(self, trainer, pl_module, stage) -> None:
        import fourdgen.stages.fit as fit

        self._trainer, m = trainer, pl_module
        for name in ("training_step", "render", "gaussians_at", "_add_regularization", "losses_finite"):
            self._wrap(m, name)
        self._wrap(m, "backward", "backward (autograd)")
        self._wrap(m, "on_after_backward", "on_after_backward (densify)")
        self._wrap(fit, "rasterize", "render/rasterize (gsplat)")
        for name in ("step_pre_backward", "step_post_backward"):
            self._wrap(m.densify, name, f"densify.{name}")
        # the compiled callables are built on first use: time what the getters return
        frame_terms, deform_fn = m._frame_terms_fn, m._deform_fn

        def deform(name):
            fn = deform_fn(name)
            return self._timed(fn, "hexplane regularization") if name == "regularization" else fn

        self._patched += [(m, "_frame_terms_fn", None), (m, "_deform_fn", None)]
        m._frame_terms_fn = lambda: self._timed(frame_terms(), "frame_terms (L1+SSIM)")
        m._deform_fn = deform

    def teardown(self, trainer, pl_module, stage) -> None:
        """Put back what :meth:`setup` wrapped (the fit module's ``rasterize`` outlives this run)."""
        for owner, name, original in reversed(self._patched):
            if original is None:  # was the class's: drop the instance attribute
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._patched = []

    def _mark(self, key: str) -> None:
        self._marks[key] = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if "start" in self._marks and self._on():
            self.times["whole step (batch start to batch start)"] += now - self._marks["start"]
            self.steps += 1
        self._marks["start"] = now

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._mark("opt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "opt" in self._marks and self._on():
            since = time.perf_counter() - self._marks["opt"]
            self.times["optimizer step + scheduler + Lightning after it"] += since

    def table(self) -> str:
        n = max(self.steps, 1)
        rows = [f"host ms per step over {n} steps (parts nest):"]
        rows += [f"  {1000 * v / n:7.2f}  {k}" for k, v in self.times.most_common()]
        return "\n".join(rows)


def run(args: argparse.Namespace, points: int, dynamic: bool, compile: bool, workdir: str) -> dict:
    synth = {
        "num_views": args.views,
        "num_frames": args.frames,
        "height": getattr(args, "height", None) or args.size,
        "width": getattr(args, "width", None) or args.size,
        "layout": "orbit",
        "elevation_deg": 25,
    }
    sync_steps = 3 if getattr(args, "sync_debug", False) else 0
    steps = args.warmup + args.steps + sync_steps
    cli = FourDGenCLI(
        args=[
            f"--config={args.config}",
            f"--model.init_args.deform={str(dynamic).lower()}",
            f"--model.init_args.compile={str(compile).lower()}",
            "--model.init_args.coarse_steps=0",
            "--model.init_args.regularizers=[]",  # no FMD: the recipe's prior needs real Wan weights
            "--model.init_args.densify.refine_stop_iter=0",  # keep N fixed
            f"--data.init_args.scene={args.scene_dir}",
            "--data.init_args.depth_model=null",  # the synthetic scene has exact depth
            f"--data.init_args.synthetic={json.dumps(synth)}",
            "--data.init_args.holdout_views=[]",
            f"--data.init_args.init_points={points}",
            f"--trainer.max_steps={steps}",
            "--trainer.accelerator=auto",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={workdir}",
            *(f"--{kv}" for kv in getattr(args, "set", [])),
        ],
        run=False,
    )
    end = args.warmup + args.steps if sync_steps else None
    timer = StepTimer(args.warmup, profile=args.profile, end=end)
    cli.trainer.callbacks.append(timer)
    host = HostTimes(args.warmup) if getattr(args, "host_times", False) else None
    if host is not None:
        cli.trainer.callbacks.append(host)
    cli.trainer.fit(cli.model, cli.datamodule)
    if args.profile:
        print(f"profile: {points} Gaussians, dynamic={dynamic}, compile={compile}\n{timer.table()}")
    if host is not None:
        print(f"{points} Gaussians, dynamic={dynamic}, compile={compile}: {host.table()}", flush=True)
    if timer.end is not None:
        print(f"{points} Gaussians, dynamic={dynamic}, compile={compile}: {timer.sync_table()}", flush=True)
    n = len(cli.model.splats["means"])
    ms = timer.ms_per_step
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"gaussians": n, "ms_per_step": ms, "it_per_s": 1000 / ms, "peak_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="lightning_configs/fit/full4d.yaml")
    p.add_argument("--points", type=int, nargs="+", default=[120_000, 1_000_000])
    p.add_argument(
        "--modes",
        nargs="+",
        choices=["static", "dynamic", "dynamic-compiled"],
        default=["static", "dynamic", "dynamic-compiled"],
    )
    p.add_argument("--profile", action="store_true", help="print the slowest kernels of 5 steps")
    p.add_argument("--sync-debug", action="store_true", help="count 3 more steps' host syncs by site")
    p.add_argument("--host-times", action="store_true", help="host time per step by part of the step")
    p.add_argument("--set", nargs="*", default=[], help="more CLI overrides, key=value (without --)")
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--scene-dir", default=None)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.scene_dir = args.scene_dir or f"{tmp}/scene"
        for points in args.points:
            for mode in args.modes:
                dynamic, compile = mode != "static", mode == "dynamic-compiled"
                r = run(args, points, dynamic, compile, f"{tmp}/{mode}{points}")
                rows.append({"mode": mode, **r})
                print(rows[-1], flush=True)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{args.config}, {args.views} views x {args.frames} frames at {args.size}x{args.size}, {dev}")
    print("| Gaussians | mode | ms/step | it/s | peak GiB |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['gaussians']:,} | {r['mode']} | {r['ms_per_step']:.1f} | {r['it_per_s']:.1f} "
            f"| {r['peak_gib']:.2f} |"
        )


if __name__ == "__main__":
    main()
