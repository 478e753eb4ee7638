"""The ``fourdgen`` CLI: user classes by class_path, config errors, and every recipe parses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from fourdgen.batch import GridBatch
from fourdgen.cli import FourDGenCLI

ROOT = Path(__file__).resolve().parents[1]
# Pipelines (lightning_configs/pipelines/) are fourdgen generate's files, parsed in test_generate.py.
RECIPES = sorted(p for p in (ROOT / "lightning_configs").rglob("*.yaml") if "pipelines" not in p.parts)


class _RandomGrids(Dataset):
    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return GridBatch.coerce(
            {
                "rgb": torch.rand(1, 2, 2, 3, self.size, self.size, generator=g) * 2 - 1,
                "K": torch.eye(3).expand(1, 2, 3, 3),
                "w2c": torch.eye(4).expand(1, 2, 2, 4, 4),
            }
        )


class UserDataModule(L.LightningDataModule):
    """A user's own DataModule, outside fourdgen: it only has to yield GridBatch."""

    def __init__(self, num_samples: int = 4, size: int = 8):
        super().__init__()
        self.num_samples, self.size = num_samples, size

    def train_dataloader(self):
        return DataLoader(
            _RandomGrids(self.num_samples, self.size), batch_size=2, collate_fn=GridBatch.collate
        )


class MeanColour(L.LightningModule):
    """Learns the mean colour of the grids (a model that consumes GridBatch)."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.lr = lr
        self.colour = torch.nn.Parameter(torch.zeros(3))

    def training_step(self, batch, batch_idx):
        batch = GridBatch.coerce(batch)
        loss = (batch.rgb - self.colour[:, None, None]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_user_datamodule_by_class_path(tmp_path):
    cli = FourDGenCLI(
        args=[
            "fit",
            "--model",
            f"{__name__}.MeanColour",
            "--data",
            f"{__name__}.UserDataModule",
            "--data.num_samples",
            "6",
            "--trainer.max_epochs",
            "2",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert isinstance(cli.datamodule, UserDataModule) and cli.datamodule.num_samples == 6
    assert cli.trainer.global_step == 6  # 3 batches x 2 epochs
    assert (tmp_path / "lightning_logs/version_0/config.yaml").is_file()


def test_grid_datamodule_by_class_path(tmp_path, tiny_scene_dir):
    cli = FourDGenCLI(
        args=[
            "fit",
            "--model",
            f"{__name__}.MeanColour",
            "--data",
            "fourdgen.data.datamodules.GridDataModule",
            f"--data.root={tiny_scene_dir}",
            "--data.num_views=2",
            "--data.num_frames=2",
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.trainer.global_step == 2


def test_config_errors_name_the_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        yaml.safe_dump({"model": {"class_path": f"{__name__}.MeanColour", "init_args": {"lrr": 1}}})
    )
    with pytest.raises(SystemExit):
        FourDGenCLI(args=["fit", "--config", str(cfg)])
    assert "lrr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        FourDGenCLI(args=["fit", "--model", f"{__name__}.MeanColour", "--model.lr", "fast"])
    assert "lr" in capsys.readouterr().err


def test_console_script_print_config():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fourdgen.main",
            "fit",
            "--model",
            "tests.test_cli.MeanColour",
            "--print_config",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    cfg = yaml.safe_load(out)
    assert cfg["model"]["class_path"] == "tests.test_cli.MeanColour"


@pytest.mark.parametrize(
    "recipe", RECIPES, ids=[str(p.relative_to(ROOT / "lightning_configs")) for p in RECIPES]
)
def test_every_recipe_parses(recipe, capsys):
    """A recipe can never rot silently: every YAML under lightning_configs/ parses through the CLI."""
    with pytest.raises(SystemExit) as e:
        FourDGenCLI(args=["fit", "--config", str(recipe), "--print_config"])
    assert e.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert "class_path" in cfg["model"]


class WrappedScene(L.LightningDataModule):
    """A user's DataModule that wraps fourdgen's (composition, not inheritance)."""

    def __init__(self, scene: str, views_held_out: int = 1):
        super().__init__()
        from fourdgen.data.scene_frames import SceneFramesDataModule

        self.inner = SceneFramesDataModule(
            scene=scene,
            synthetic={"num_views": 3, "num_frames": 2, "height": 32, "width": 32, "supersample": 1},
            holdout_views=[views_held_out],
            init_points=200,
        )

    def prepare_data(self):
        self.inner.prepare_data()

    def setup(self, stage=None):
        self.inner.setup(stage)

    def scene_info(self):
        return self.inner.scene_info()

    def train_dataloader(self):
        return self.inner.train_dataloader()

    def val_dataloader(self):
        return self.inner.val_dataloader()


class NoSceneInfo(UserDataModule):
    """Yields GridBatch but lacks the stage-3 method."""


def _fit_args(tmp_path, data):
    return [
        "fit",
        "--config=lightning_configs/tiny/fit.yaml",
        f"--data={data}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=2",
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
    ]


def test_a_users_datamodule_can_wrap_fourdgens(tmp_path):
    cli = FourDGenCLI(
        args=[*_fit_args(tmp_path, f"{__name__}.WrappedScene"), f"--data.scene={tmp_path / 's'}"]
    )
    assert cli.trainer.global_step == 2
    assert cli.datamodule.inner.hparams.synthetic["num_views"] == 3  # its own arguments, not the wrapper's
    assert "views_held_out" not in cli.datamodule.inner.hparams


def test_a_datamodule_without_the_stage_protocol_is_named_before_training(tmp_path):
    from fourdgen.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"NoSceneInfo\): Gaussian4DFitter .* needs a DataModule with scene_info\(\)"
    ):
        FourDGenCLI(args=_fit_args(tmp_path, f"{__name__}.NoSceneInfo"))


def test_model_vae_and_conditioning_reach_the_datamodule_once(tmp_path):
    """The recipe names the VAE and conditioning once (on the model); the CLI links them to the data."""
    cli = FourDGenCLI(
        args=[
            "--config=lightning_configs/tiny/video.yaml",
            f"--data.init_args.root={tmp_path}",
            '--model.init_args.vae={"preset": "tiny", "seed": 5}',
            "--model.init_args.conditioning.init_args.xyz_mask=0.25",
        ],
        run=False,
    )
    assert cli.datamodule.hparams.vae == {"preset": "tiny", "seed": 5} == cli.model.hparams.vae
    assert cli.datamodule.conditioning.xyz_mask == 0.25 == cli.model.conditioning.xyz_mask
    assert cli.datamodule.conditioning is not cli.model.conditioning  # same settings, own objects
