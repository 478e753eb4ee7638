"""Interrupted runs and numerical faults lose nothing.

- ``fourdgen fit`` SIGKILLed mid-run (stage 3 and a tiny stage 1) resumes from its last checkpoint
  at the same step and continues with the same losses as a run that was never interrupted.
- A checkpoint write killed half-way leaves the previous checkpoint intact and loadable.
- A truncated checkpoint given to ``--ckpt_path`` is one line naming the file.
- Non-finite trainable weights are never written to a checkpoint.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from fourdgen.callbacks.checkpoint import ModelCheckpoint
from fourdgen.cli import checkpoint_step
from fourdgen.main import main

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("FOURDGEN_DEBUG", None)
    return env


def _losses(run_dir: Path) -> dict[int, float]:
    """``train/loss`` by global step from every CSVLogger version under ``run_dir`` (later wins)."""
    out: dict[int, float] = {}
    for f in sorted(run_dir.glob("lightning_logs/version_*/metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def _kill_at_first_checkpoint(cmd: list[str], ckpt: Path, timeout: float = 240) -> int:
    """Start ``cmd``, SIGKILL it as soon as ``ckpt`` exists; returns the checkpoint's step."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    try:
        while not ckpt.exists():
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended (rc {proc.returncode}) before its first checkpoint: "
                    f"{proc.stderr.read().decode()[-2000:]}"
                )
            if time.monotonic() - t0 > timeout:
                pytest.fail("no checkpoint within the timeout")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step = checkpoint_step(ckpt)
    assert step is not None, f"{ckpt} is not a readable checkpoint after the kill"
    return step


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _fit_cmd(recipe: str, out: Path, steps: int, every: int, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fourdgen.main",
        "fit",
        f"--config={recipe}",
        f"--trainer.max_steps={steps}",
        f"--trainer.default_root_dir={out}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={out}",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=fourdgen.callbacks.checkpoint.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={out}/ck",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=0",
        f"--trainer.callbacks.every_n_train_steps={every}",
        *extra,
    ]


@pytest.mark.parametrize(
    "recipe,steps,every,extra",
    [
        (
            "lightning_configs/tiny/fit.yaml",
            24,
            8,
            ["--model.init_args.coarse_steps=4", "--trainer.check_val_every_n_epoch=1000"],
        ),
        ("lightning_configs/tiny/video.yaml", 4, 2, ["--trainer.check_val_every_n_epoch=1000"]),
    ],
    ids=["stage3", "stage1"],
)
def test_sigkill_mid_fit_resumes_with_the_same_losses(tmp_path, recipe, steps, every, extra):
    """A run killed after its first checkpoint and resumed from ``last.ckpt`` logs, step for step,
    the losses of an uninterrupted run of the same recipe."""

    def data(d: Path) -> list[str]:  # each run its own copy of the (seeded, identical) data
        if "fit" in recipe:
            return [f"--data.init_args.scene={d / 'scene'}"]
        return [f"--data.init_args.root={d / 'scenes'}", f"--data.init_args.cache_dir={d / 'cache'}"]

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # The uninterrupted reference runs beside the one to be killed (one thread each: two cores).
    ref.mkdir()
    with (ref / "stderr.txt").open("w+") as log:  # a file, not a pipe nobody reads while it runs
        reference = subprocess.Popen(
            _fit_cmd(recipe, ref, steps, every, [*extra, *data(ref)]),
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            step = _kill_at_first_checkpoint(
                _fit_cmd(recipe, cut, steps, every, [*extra, *data(cut)]), cut / "ck" / "last.ckpt"
            )
            reference.wait(timeout=600)
        finally:
            if reference.poll() is None:
                reference.kill()
        log.seek(0)
        assert reference.returncode == 0, log.read()[-3000:]
    assert 0 < step < steps
    resume = f"--ckpt_path={cut / 'ck' / 'last.ckpt'}"
    _run([*_fit_cmd(recipe, cut, steps, every, [*extra, *data(cut)]), resume])
    want, got = _losses(ref), _losses(cut)
    assert checkpoint_step(cut / "ck" / "last.ckpt") == steps == checkpoint_step(ref / "ck" / "last.ckpt")
    after = sorted(s for s in want if s >= step)
    assert after and all(s in got for s in after), (sorted(got), after)
    for s in after:
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-7), f"step {s}"


# ----------------------------------------------------------------------- checkpoint writes
_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import lightning as L, torch
    from fourdgen.callbacks.checkpoint import ModelCheckpoint

    class M(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(4, 4)
        def training_step(self, batch, i):
            return self.w(batch[0]).square().mean()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class SlowSecondSave(L.Callback):
        # The second save writes half a file, says so, and hangs: the test kills it there.
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                io = trainer.strategy.checkpoint_io
                def half(checkpoint, path, storage_options=None):
                    with open(path, "wb") as f:
                        f.write(b"PK" + b"x" * 1000)
                        f.flush()
                    print("WRITING", flush=True)
                    time.sleep(120)
                io.save_checkpoint = half

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
    ck = ModelCheckpoint(dirpath=sys.argv[1], save_last=True, save_top_k=0, every_n_train_steps=1)
    L.Trainer(max_steps=4, callbacks=[SlowSecondSave(), ck], logger=False, enable_progress_bar=False,
              enable_model_summary=False).fit(M(), data)
    """
)


def test_a_checkpoint_write_killed_half_way_leaves_the_last_one_intact(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        before = (tmp_path / "last.ckpt").read_bytes()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "last.ckpt").read_bytes() == before
    assert checkpoint_step(tmp_path / "last.ckpt") == 1  # the step-1 save, whole
    assert [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"] == [".last.ckpt.partial"]


def test_truncated_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    good = tmp_path / "good.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.zeros(1000)}}, good)
    data = good.read_bytes()
    for name, content in (
        ("half.ckpt", data[: len(data) // 2]),
        ("empty.ckpt", b""),
        ("text.ckpt", b"hello"),
    ):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(SystemExit) as e:
            main(["fit", "--config", "lightning_configs/tiny/fit.yaml", f"--ckpt_path={bad}"])
        assert e.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and str(bad) in err[0] and "not a complete PyTorch checkpoint" in err[0], err
    with pytest.raises(SystemExit):
        main(
            ["fit", "--config", "lightning_configs/tiny/fit.yaml", f"--ckpt_path={tmp_path / 'nowhere.ckpt'}"]
        )
    assert "no such file" in capsys.readouterr().err


# ------------------------------------------------------------------------------ non-finite
class _Poisoned(L.LightningModule):
    """Finite losses, but a weight turns NaN at the end of step 2, after that step's checkpoint (an
    optimizer fault that the loss checks cannot see)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Linear(4, 4)

    def training_step(self, batch, i):
        return self.w(batch[0]).square().mean().clamp(max=1e3).nan_to_num(0.0)

    def on_train_batch_end(self, outputs, batch, i):
        if self.global_step == 2:
            with torch.no_grad():
                self.w.weight[0, 0] = float("nan")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=2)
    ck = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = L.Trainer(max_steps=5, callbacks=[ck], logger=False, enable_progress_bar=False)
    with pytest.raises(FloatingPointError, match="non-finite trainable weights at global step 3"):
        trainer.fit(_Poisoned(), data)
    assert checkpoint_step(tmp_path / "last.ckpt") == 2
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


# ----------------------------------------------------------------------------- data loading
def _dataset_with_bad_scenes(root: Path) -> list[Path]:
    """Four scenes: two good, one whose scene.json is malformed, one with a truncated frame."""
    import numpy as np

    from fourdgen.data.scene_writer import write_scene

    w2c = torch.eye(4).repeat(1, 2, 1, 1)
    w2c[..., 2, 3] = 3.0
    K = torch.tensor([[[10.0, 0, 4], [0, 10.0, 4], [0, 0, 1]]])
    paths = []
    for i in range(4):
        rgb = np.full((1, 2, 8, 8, 3), 40 * (i + 1), np.uint8)
        paths.append(write_scene(root / f"s{i}", rgb, K, w2c, caption=f"scene {i}"))
    (root / "s1" / "scene.json").write_text('{"format": "fourdgen-scene", "width": ')
    frame = root / "s2" / "rgb" / "view00" / "0001.png"
    frame = frame if frame.exists() else sorted((root / "s2").rglob("*.png"))[-1]
    data = frame.read_bytes()
    frame.write_bytes(data[: data.index(b"IDAT") + 6])  # the header reads, the pixels do not decode
    return paths


def test_bad_samples_are_skipped_with_a_warning_and_counted_even_in_workers(tmp_path):
    from fourdgen.batch import GridBatch
    from fourdgen.data.datamodules import GridDataset, resumable_loader
    from fourdgen.data.scene import SceneFormatError

    paths = _dataset_with_bad_scenes(tmp_path)
    with pytest.warns(UserWarning, match=r"skipping a bad sample \(1 so far.*s1.*scene.json"):
        ds = GridDataset(paths, num_frames=2)
    assert ds.skipped == 1 and [s.caption for s in ds.scenes] == ["scene 0", "scene 2", "scene 3"]
    loader = resumable_loader(ds, batch_size=1, num_workers=2, collate_fn=GridBatch.collate, timeout=60)
    with _no_hang():
        captions = [b.caption[0] for b in loader]  # the truncated frame is replaced, no worker dies
    assert len(captions) == 3 and "scene 2" not in captions and set(captions) <= {"scene 0", "scene 3"}
    with pytest.warns(UserWarning, match=r"views\[0\]\.rgb\[1\]"):
        assert ds[1].caption == ["scene 3"]  # in this process: warned, counted, the next scene's
    assert ds.skipped == 2
    with pytest.raises(SceneFormatError, match="s1.*scene.json"):
        GridDataset(paths, num_frames=2, on_bad_sample="error")
    strict = GridDataset([paths[0], paths[2]], num_frames=2, on_bad_sample="error")
    with pytest.raises(SceneFormatError, match=r"views\[0\]\.rgb\[1\].*PNG or JPEG"):
        strict[1]


class _no_hang:
    """Loader workers' warnings go to their own stderr; here only finishing (no hang) matters."""

    def __enter__(self):
        self.t0 = time.monotonic()

    def __exit__(self, *exc):
        assert time.monotonic() - self.t0 < 60
        return False
