"""The CLI's user-facing behaviour: one-line errors, no option prefixes, GPU recipes on CPU, --overwrite,
predict without weights, progress lines without a TTY, no empty version dirs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

import fourdgen.cli as cli_mod
from fourdgen.callbacks.guard import GuardedOutput
from fourdgen.callbacks.progress import LineProgress, StepProgressBar
from fourdgen.cli import TINY_TWINS, FourDGenCLI, checkpoint_step, needs_gpu
from fourdgen.entry import is_own_error
from fourdgen.errors import ConfigError
from fourdgen.main import main

ROOT = Path(__file__).resolve().parents[1]
M = f"{__name__}.TinyRegressor"
D = f"{__name__}.TinyData"


class TinyData(L.LightningDataModule):
    """8 samples, batches of 2: 4 steps per epoch, with val/test/predict loaders."""

    def __init__(self, num_samples: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(num_samples, 3, generator=g)
        self.ds = TensorDataset(x, x.sum(1, keepdim=True))

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=2)

    def val_dataloader(self):
        return DataLoader(self.ds, batch_size=4)

    test_dataloader = val_dataloader

    def predict_dataloader(self):
        return DataLoader(self.ds, batch_size=4)


class TinyRegressor(L.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Linear(3, 1)

    def _mse(self, batch):
        x, y = batch
        return (self.net(x) - y).pow(2).mean()

    def training_step(self, batch, batch_idx):
        loss = self._mse(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/mse", self._mse(batch))

    def test_step(self, batch, batch_idx):
        self.log("test/mse", self._mse(batch))

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class RandomWeights(TinyRegressor):
    def weights_source(self) -> str | None:
        return None


class TrainedWeights(TinyRegressor):
    def weights_source(self) -> str | None:
        return "init.ckpt"


class FailsInSetup(TinyRegressor):
    def configure_optimizers(self):
        raise ValueError("broken optimizer config")


class Writer(GuardedOutput, L.Callback):
    """An output-writing callback: records what ``overwrite`` was when fit started."""

    def on_fit_start(self, trainer, pl_module):
        self.seen_overwrite = self.overwrite


def _fit_args(tmp_path: Path, *extra: str, model: str = M) -> list[str]:
    return [
        "fit",
        "--model",
        model,
        "--data",
        D,
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def _err_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


# -- 1. one-line errors ----------------------------------------------------------------------------


def test_own_error_is_one_line_exit_1(monkeypatch, capsys):
    """A GPU recipe on CPU: fourdgen's ConfigError as one line + hint, exit 1, before any class is built."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(FourDGenCLI, "instantiate_classes", lambda self: pytest.fail("built classes"))
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "lightning_configs/video/4dnex.yaml"])
    assert e.value.code == 1
    lines = _err_lines(capsys)
    assert len(lines) == 2 and lines[0].startswith("fourdgen: error: ") and "--debug" in lines[1]
    assert "lightning_configs/tiny/video.yaml" in lines[0] and "CUDA GPU" in lines[0]


def test_debug_flag_and_env_give_the_traceback(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("FOURDGEN_DEBUG", raising=False)
    with pytest.raises(ConfigError, match="tiny/video.yaml"):
        main(["fit", "--debug", "--config", "lightning_configs/video/4dnex.yaml"])
    assert "FOURDGEN_DEBUG" not in os.environ and "JSONARGPARSE_DEBUG" not in os.environ  # restored
    monkeypatch.setenv("FOURDGEN_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["fit", "--config", "lightning_configs/video/4dnex.yaml"])


def test_console_script_error_is_one_line():
    """End to end, as a user runs it: no traceback, a few lines, exit 1 (CUDA hidden)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("FOURDGEN_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "fourdgen.main", "fit", "--config", "lightning_configs/video/4dnex.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    assert "fourdgen: error: " in proc.stderr and "lightning_configs/tiny/video.yaml" in proc.stderr


def test_parse_errors_are_one_line_exit_1(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"class_path": M, "init_args": {"lrr": 1}}}))
    for args, key in (
        (["fit", "--config", str(cfg)], "lrr"),
        (["fit", "--model", M, "--model.lr", "fast"], '"lr"'),
        (["fit", "--model", M, "--trainer.max_stepz", "3"], "max_stepz"),
    ):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 1
        lines = _err_lines(capsys)
        assert len(lines) <= 2 and lines[0].startswith("fourdgen: error: ") and key in lines[0], lines
        assert not any("usage:" in line for line in lines)


def test_help_still_prints_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--help"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "usage:" in out and "--overwrite" in out and "--trainer.max_steps" in out


def test_which_errors_are_own():
    from fourdgen.geometry.pointcloud import render_points
    from fourdgen.geometry.pointmaps import denormalize_latents

    def caught(fn):
        try:
            fn()
        except Exception as e:
            return e
        raise AssertionError("no exception")

    assert is_own_error(ConfigError("x"))
    pts = torch.zeros(4, 3)
    assert is_own_error(caught(lambda: render_points(pts, pts, torch.eye(3), None, 4, 4, radius_px=-1)))
    # a torch op failing inside fourdgen's code is a bug: keep the traceback
    assert not is_own_error(caught(lambda: denormalize_latents(torch.zeros(2, 3), scale=torch.zeros(4))))
    assert not is_own_error(caught(lambda: int("x")))  # raised outside fourdgen


# -- 2. no prefix matching -------------------------------------------------------------------------


def test_no_option_prefixes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--model", M, "--trainer.max_step", "5", "--print_config"])
    assert e.value.code == 1 and "--trainer.max_step " in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the subcommand parser too, when called directly
        FourDGenCLI(args=["fit", "--model", M, "--trainer.max_step", "5"])


# -- 3. GPU recipes on CPU -------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(TINY_TWINS))
def test_every_gpu_recipe_has_a_tiny_twin(recipe):
    cfgs = ROOT / "lightning_configs"
    assert needs_gpu(yaml.safe_load((cfgs / recipe).read_text())["trainer"])
    for twin in TINY_TWINS[recipe]:
        assert not needs_gpu(yaml.safe_load((cfgs / twin).read_text()).get("trainer", {})), twin


def test_needs_gpu():
    assert needs_gpu({"accelerator": "cuda"}) and needs_gpu({"strategy": "fsdp"})
    assert needs_gpu({"accelerator": "auto", "devices": [0, 1]})
    assert not needs_gpu({"accelerator": "cpu", "strategy": "ddp", "devices": 2})
    assert not needs_gpu({"accelerator": "auto", "strategy": "ddp"})


# -- 4. --overwrite --------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_overwrite_reaches_guarded_callbacks(tmp_path, flag):
    cli = FourDGenCLI(
        args=_fit_args(
            tmp_path,
            "--trainer.max_steps=1",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.limit_val_batches=0",
            f"--trainer.callbacks+={__name__}.Writer",
            *flag,
        )
    )
    (writer,) = [c for c in cli.trainer.callbacks if isinstance(c, Writer)]
    assert writer.seen_overwrite is bool(flag)


# -- 5. predict with random weights ----------------------------------------------------------------


def _predict_args(tmp_path: Path, model: str) -> list[str]:
    return ["predict", "--model", model, "--data", D, f"--trainer.default_root_dir={tmp_path}"]


def test_predict_refuses_random_weights(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(_predict_args(tmp_path, f"{__name__}.RandomWeights"))
    assert e.value.code == 1
    (line, _hint) = _err_lines(capsys)
    assert "predict: RandomWeights has no trained weights" in line and "--ckpt_path" in line
    # trained weights, or a model that does not say: predict runs
    for model in (f"{__name__}.TrainedWeights", M):
        cli = FourDGenCLI(args=[*_predict_args(tmp_path, model), "--trainer.logger=false"])
        assert cli.trainer.predict_loop.predictions


# -- 6. progress -----------------------------------------------------------------------------------

_STEP = re.compile(r"^fit: step (\d+)/(\d+) \((\d+)%\) epoch (\d+)")


def test_progress_lines_without_tty(tmp_path, capsys):
    """Captured stdout is no TTY: the default interval prints the first step and the end, with totals
    out of max_steps across epochs, then the final held-out metrics."""
    cli = FourDGenCLI(
        args=_fit_args(
            tmp_path,
            "--trainer.max_steps=8",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
        )
    )
    assert isinstance(cli.trainer.progress_bar_callback, LineProgress)
    out = capsys.readouterr().out.splitlines()
    steps = [tuple(map(int, m.groups())) for line in out if (m := _STEP.match(line))]
    assert steps[0][:2] == (1, 8) and steps[-1][:2] == (8, 8) and steps[-1][3] == 1  # second epoch
    assert all(k <= n == 8 for k, n, *_ in steps)
    assert "train/loss" in next(line for line in out if _STEP.match(line))
    assert "fit (step 4): validating batch 2/2" in out and not any("\r" in line for line in out)
    (block,) = [line for line in out if line.startswith("fourdgen: final held-out metrics")]
    assert block.startswith("fourdgen: final held-out metrics (step 8): val/mse ") and "train/" not in block


def test_final_metrics_name_their_step(tmp_path, capsys):
    """max_steps stopping mid-epoch after the last validation: the block says which step it measured.
    ``test`` ends with its test/* metrics."""
    args = [
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
    ]
    FourDGenCLI(args=_fit_args(tmp_path, "--trainer.max_steps=6", *args))
    assert "final held-out metrics (step 4; training ended at step 6): val/mse" in capsys.readouterr().out
    FourDGenCLI(args=["test", "--model", M, "--data", D, f"--trainer.default_root_dir={tmp_path}", *args])
    assert "fourdgen: final held-out metrics (step 0): test/mse " in capsys.readouterr().out


def test_progress_every_step_when_configured(tmp_path, capsys):
    """A user's own LineProgress (here every step) replaces the default; totals stay out of max_steps."""
    FourDGenCLI(
        args=_fit_args(
            tmp_path,
            "--trainer.max_steps=6",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.limit_val_batches=0",
            "--trainer.callbacks+=fourdgen.callbacks.progress.LineProgress",
            "--trainer.callbacks.interval_s=0",
        )
    )
    out = capsys.readouterr().out.splitlines()
    steps = [int(m.group(1)) for line in out if (m := _STEP.match(line))]
    assert steps == [1, 2, 3, 4, 5, 6, 6]  # every step, then the end
    assert "eta" in [line for line in out if _STEP.match(line)][1]
    assert not any(line.startswith("fourdgen: final held-out") for line in out)  # no validation ran


def test_progress_bar_disabled_prints_nothing(tmp_path, capsys):
    cli = FourDGenCLI(
        args=_fit_args(
            tmp_path,
            "--trainer.max_steps=2",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
        )
    )
    assert cli.trainer.progress_bar_callback is None
    assert not any(_STEP.match(line) for line in capsys.readouterr().out.splitlines())


class _BarProbe(L.Callback):
    def __init__(self):
        self.seen: list[tuple[int, int, int]] = []

    def on_train_batch_end(self, trainer, *_):
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((bar.n, bar.total, trainer.current_epoch))


def test_tty_bar_counts_steps_out_of_max_steps(tmp_path, monkeypatch):
    """With a TTY the CLI picks the tqdm bar; step-limited, its one bar counts global steps / max_steps
    across epochs (Lightning's reads 'Epoch 1' with per-epoch totals)."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    cli = FourDGenCLI(args=_fit_args(tmp_path, "--trainer.logger=false")[1:], run=False)
    assert isinstance(cli.trainer.progress_bar_callback, StepProgressBar)
    bar, probe = StepProgressBar(), _BarProbe()
    trainer = L.Trainer(
        max_steps=6,
        callbacks=[bar, probe],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        enable_model_summary=False,
    )
    trainer.fit(TinyRegressor(), datamodule=TinyData())
    assert bar.total_train_steps == 6 and probe.seen[-1][2] == 1  # one bar across two epochs
    assert all(total == 6 and n <= total for n, total, _ in probe.seen)
    assert bar.train_progress_bar.n == 6 and bar.train_progress_bar.total == 6


# -- 7. no empty version dirs ----------------------------------------------------------------------


def test_finished_checkpoint_stops_before_a_version_dir(tmp_path, capsys):
    cli = FourDGenCLI(args=_fit_args(tmp_path, "--trainer.max_steps=2", "--trainer.limit_val_batches=0"))
    (ckpt,) = (tmp_path / "lightning_logs/version_0/checkpoints").glob("*.ckpt")
    assert cli.trainer.global_step == 2 and checkpoint_step(ckpt) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(_fit_args(tmp_path, "--trainer.max_steps=2", f"--ckpt_path={ckpt}"))
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"{ckpt} already finished at step 2 (trainer.max_steps 2)" in out and "--trainer.max_steps" in out
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    assert checkpoint_step(tmp_path) is None and checkpoint_step(tmp_path / "nope.ckpt") is None


def test_failed_or_stepless_run_leaves_no_version_dir(tmp_path):
    logs = tmp_path / "lightning_logs"
    with pytest.raises(ValueError, match="broken optimizer config"):
        FourDGenCLI(args=_fit_args(tmp_path, "--trainer.max_steps=2", model=f"{__name__}.FailsInSetup"))
    assert not logs.exists()  # its version_0 and the lightning_logs/ it made are gone
    # a version dir that was there before is never touched, even if it holds only a config
    (logs / "version_0").mkdir(parents=True)
    (logs / "version_0/config.yaml").write_text("user: file\n")
    with pytest.raises(ValueError):
        FourDGenCLI(args=_fit_args(tmp_path, "--trainer.max_steps=2", model=f"{__name__}.FailsInSetup"))
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]
    # a run that takes no step (no training batches) leaves nothing either
    FourDGenCLI(args=_fit_args(tmp_path, "--trainer.max_steps=2", "--trainer.limit_train_batches=0"))
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]
    # a run that trained keeps its dir (scalars and checkpoints)
    FourDGenCLI(args=_fit_args(tmp_path, "--trainer.max_steps=2", "--trainer.log_every_n_steps=1"))
    run = logs / "version_1"
    assert run.is_dir() and not cli_mod.only_setup_files(run)
    for ckpt in (run / "checkpoints").iterdir():  # its scalars alone make it a real run
        ckpt.unlink()
    assert not cli_mod.only_setup_files(run)


def test_setup_only_dirs_are_recognised(tmp_path):
    """Set-up leaves config.yaml, hparams.yaml and an event file with the hparams summary; one scalar or
    any other file makes the dir a real run's."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="logs")
    logger.log_hyperparams({"lr": 0.1, "net": {"width": 3}})  # hp_metric and the _hparams_ summary
    logger.experiment.flush()
    run = Path(logger.log_dir)
    (run / "config.yaml").write_text("model: {}\n")
    assert cli_mod.only_setup_files(run)
    logger.log_metrics({"train/loss": 1.0}, step=1)
    logger.experiment.flush()
    assert not cli_mod.only_setup_files(run)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("x: 1\n")
    (other / "notes.txt").write_text("mine\n")
    assert not cli_mod.only_setup_files(other) and not cli_mod.only_setup_files(tmp_path / "missing")
