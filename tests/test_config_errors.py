"""Config faults end in one clear error before any work starts, naming the config key.

Each case runs the real ``fourdgen`` entry on a tiny recipe with one fault: a weight path that is
not there, a preset name that does not exist, a fused-attention mask term the coupling's layout
cannot provide, a frame count or size the Wan VAE cannot take. It must exit 1 with one
``fourdgen: error:`` line naming the key and what it accepts, no traceback, and without having
done any work (the DataModule's synthetic scenes are not written). A DataModule whose batches lack a
field the stage reads fails on its first batch, naming the field and the DataModule class.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import fourdgen.backbones.wan  # noqa: F401  diffusers' log handler must bind the session's stderr,
from fourdgen.config_checks import check_config  # not one test's capsys stream (closed after it)
from fourdgen.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "lightning_configs" / "tiny"


def _fail(argv: list[str], capsys) -> str:
    """Run ``fourdgen <argv>``; it must exit 1 with one error line. Returns that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fourdgen: error:")]
    assert len(lines) == 1, err
    assert err.rstrip().endswith(lines[0] + "\n(run with --debug or FOURDGEN_DEBUG=1 for the traceback)"), err
    return lines[0]


# (recipe, data root key, arguments, the error line's pattern)
CASES = {
    "wan_path_missing": (
        "video",
        "root",
        ["--model.init_args.transformer.path={tmp}/no_wan"],
        r"model\.init_args\.transformer\.path: \S+/no_wan does not exist .*nothing is downloaded",
    ),
    "wan_path_not_a_checkpoint": (
        "video",
        "root",
        ["--model.init_args.vae.path={tmp}"],
        r"model\.init_args\.vae\.path: no config\.json in \S+/vae \(a local diffusers-format checkpoint",
    ),
    "init_lora_missing": (
        "video",
        "root",
        ["--model.init_args.init_lora={tmp}/lora"],
        r"model\.init_args\.init_lora: \S+/lora does not exist",
    ),
    "vggt_checkpoint_missing": (
        "recon_static",
        "root",
        ["--model.init_args.vggt_checkpoint={tmp}/vggt.pt"],
        r"model\.init_args\.vggt_checkpoint: \S+/vggt\.pt does not exist",
    ),
    "prior_checkpoint_missing": (  # a key inside a list of components
        "fit_fmd",
        "scene",
        ["--model.init_args.regularizers.prior.init_args.checkpoint={tmp}/prior.ckpt"],
        r"model\.init_args\.regularizers\[0\]\.init_args\.prior\.init_args\.checkpoint: \S+/prior\.ckpt "
        r"does not exist",
    ),
    "transformer_preset": (
        "video",
        "root",
        ["--model.init_args.transformer.preset=b5"],
        r"model\.init_args\.transformer\.preset: 'b5' is not one of tiny, 1\.3b, 14b, 14b-i2v, 5b",
    ),
    "vae_preset": (
        "full4d",
        "root",
        ["--model.init_args.vae.preset=wan22"],
        r"model\.init_args\.vae\.preset: 'wan22' is not one of tiny, wan2\.1, wan2\.2 "
        r"\(did you mean 'wan2\.2'\?\)",
    ),
    "vggt_preset": (
        "recon_static",
        "root",
        ["--model.init_args.preset=1B"],
        r"model\.init_args\.preset: '1B' is not one of 1b, tiny \(did you mean '1b'\?\)",
    ),
    "spec_key_typo": (
        "video",
        "root",
        ["--model.init_args.transformer={presets: tiny}"],
        r"model\.init_args\.transformer: unknown key 'presets' "
        r"\(it takes path, preset, .*did you mean 'preset'",
    ),
    "mask_term_without_condition_frames": (
        "4real_v2",
        "root",
        ["--model.init_args.coupling.init_args.mask=[same_view, same_time, cross_half]"],
        r"model\.init_args\.coupling\.init_args\.mask: 'cross_half' attends to condition frames, which the "
        r"ReferenceGrid layout does not have",
    ),
    "mask_term_unknown": (
        "full4d",
        "root",
        ["--model.init_args.coupling.init_args.mask=[same_view, same_tme]"],
        r"model\.init_args\.coupling\.init_args\.mask: 'same_tme' is not one of same_view, same_time",
    ),
    "lse_backend_with_cross_half": (
        "full4d",
        "root",
        ["--model.init_args.coupling.init_args.backend=lse"],
        r"model\.init_args\.coupling\.init_args\.backend: 'lse' computes exactly same_view \| same_time; "
        r"the mask \['cross_half', 'same_time', 'same_view'\] needs 'flex'",
    ),
    "frames_not_tk_plus_1": (
        "video",
        "root",
        ["--data.init_args.num_frames=6"],
        r"data\.init_args\.num_frames: 6, but the VAE \(model\.init_args\.vae: \{\"preset\": \"tiny\"\}\) "
        r"takes 2k\+1 frames \(temporal factor 2\): use 5 or 7",
    ),
    "schedule_frames": (
        "4real_v2",
        "root",
        ["--data.init_args.clip_schedule={0: 5, 200: 8}"],
        r"data\.init_args\.clip_schedule\.200: 8, but the VAE .* takes 2k\+1 frames .*: use 7 or 9",
    ),
    "fsdp2_data_parallel_auto": (  # Lightning's "auto": one data-parallel rank per node
        "video",
        "root",
        [
            "--trainer.devices=2",
            "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
            "--trainer.strategy.tensor_parallel_size=1",
        ],
        r"trainer\.strategy\.init_args\.data_parallel_size: 'auto' \(a data-parallel size of 1\), expected 2 "
        r"\(trainer\.devices 2 x trainer\.num_nodes 1\)",
    ),
    "fsdp2_tensor_parallel": (
        "video",
        "root",
        ["--trainer.devices=2", "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy"],
        r"trainer\.strategy\.init_args\.tensor_parallel_size: 'auto' \(a tensor-parallel size of 2\); "
        r"fourdgen shards with FSDP2 only: set it to 1 and data_parallel_size to 2",
    ),
    "frame_size": (
        "one4d",
        "root",
        ["--data.init_args.height=30"],
        r"data\.init_args\.height: 30 is not a multiple of 4 \(the VAE's spatial factor 2",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_fault_is_one_line_naming_the_key_before_any_work(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs of the recipe land here, and must not appear
    recipe, data_key, args, pattern = CASES[case]
    data = tmp_path / "data"
    line = _fail(
        [
            "fit",
            f"--config={TINY / recipe}.yaml",
            f"--trainer.default_root_dir={tmp_path / 'out'}",
            f"--data.init_args.{data_key}={data}",
            *(a.replace("{tmp}", str(tmp_path)) for a in args),
        ],
        capsys,
    )
    assert re.search(pattern, line), line
    assert not data.exists() and not (tmp_path / "out").exists()  # nothing was prepared or written


def test_gpu_recipes_with_fsdp2_cover_every_process():
    """The recipes that shard (Full-4D's grid model) size the mesh as their devices."""
    import yaml

    from fourdgen.config_checks import check_fsdp_mesh

    sharded = 0
    for recipe in sorted((ROOT / "lightning_configs").rglob("*.yaml")):
        trainer = (yaml.safe_load(recipe.read_text()) or {}).get("trainer") or {}
        if "ModelParallelStrategy" in str(trainer.get("strategy")):
            check_fsdp_mesh(trainer)
            sharded += 1
    assert sharded >= 1


def test_weights_read_only_by_fit_are_not_required_elsewhere():
    """The reconstructor opens ``init_checkpoint`` / ``vggt_checkpoint`` in ``setup("fit")`` only: a
    ``predict --ckpt_path`` of the dynamic recipe must not fail on the static checkpoint it started from."""
    model = {
        "class_path": "fourdgen.stages.recon.FeedForwardReconstruction",
        "init_args": {"init_checkpoint": "/nowhere/last.ckpt", "lpips_weights": None},
    }
    check_config({"model": model}, "predict")
    with pytest.raises(ValueError, match=r"model\.init_args\.init_checkpoint: /nowhere/last\.ckpt does not"):
        check_config({"model": model}, "fit")


def test_a_grid_coupling_built_in_python_refuses_the_mask_too():
    from fourdgen.nn.grid_coupling import ProjectionGrid, ReferenceGrid

    with pytest.raises(ValueError, match="ReferenceGrid.mask: 'cross_half' attends to condition frames"):
        ReferenceGrid(mask=["same_view", "cross_half"])
    assert ProjectionGrid(mask=["same_view", "cross_half"]).mask.terms == ("same_view", "cross_half")


# ------------------------------------------------------------------- batches without a field
def _clip(T: int = 5, H: int = 32, W: int = 32, **drop) -> dict:
    """One synthetic one-view clip as a dict batch (GridBatch's field names)."""
    w2c = torch.eye(4).expand(1, 1, T, 4, 4).clone()
    w2c[..., 2, 3] = 3.0
    b = {
        "rgb": torch.rand(1, 1, T, 3, H, W) * 2 - 1,
        "K": torch.tensor([[20.0, 0, W / 2], [0, 20.0, H / 2], [0, 0, 1]]).expand(1, 1, 3, 3).clone(),
        "w2c": w2c,
        "depth": torch.full((1, 1, T, 1, H, W), 3.0),
        "text_embeds": torch.randn(1, 8, 32),
    }
    return {k: v for k, v in b.items() if k not in drop}


class ClipsWithout(L.LightningDataModule):
    """A user's DataModule: dict batches of :func:`_clip` without the fields named in ``drop``."""

    def __init__(self, drop: list[str] | None = None):
        super().__init__()
        self.drop = list(drop or [])

    def _loader(self) -> DataLoader:
        return DataLoader([_clip(**dict.fromkeys(self.drop))] * 2, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()


@pytest.mark.parametrize(
    "drop,pattern",
    [
        (
            ["text_embeds"],
            r"data tests\.test_config_errors\.ClipsWithout: its train batches have no "
            r"GridBatch\.text_embeds, "
            r"which VideoDiffusion needs \(the DiT's text conditioning: give the DataModule a text_encoder\)",
        ),
        (
            ["depth"],
            r"ClipsWithout: its train batches have no GridBatch\.xyz or GridBatch\.depth or "
            r"GridBatch\.xyz_latents, which VideoDiffusion needs \(the pointmaps",
        ),
        (
            ["K"],
            r"ClipsWithout: its train batches break the GridBatch contract \(fourdgen/batch\.py\): "
            r"GridBatch: required fields \['K'\] are missing",
        ),
    ],
    ids=["text_embeds", "pointmaps", "cameras"],
)
def test_a_datamodule_without_a_field_the_stage_needs(drop, pattern, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _fail(
        [
            "fit",
            f"--config={TINY / 'video.yaml'}",
            "--data=tests.test_config_errors.ClipsWithout",
            f"--data.drop={drop}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.max_steps=1",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
        ],
        capsys,
    )
    assert re.search(pattern, line), line


def test_a_grid_datamodule_without_depth_for_the_projection(tmp_path, capsys, monkeypatch):
    """Full-4D's projection reads the source view's depth: MultiViewDataModule with load_depth false
    stops on its first (sanity-check validation) batch, naming the DataModule and the field."""
    monkeypatch.chdir(tmp_path)
    line = _fail(
        [
            "fit",
            f"--config={TINY / 'full4d.yaml'}",
            f"--data.init_args.root={tmp_path / 'mv'}",
            "--data.init_args.load_depth=false",
            "--data.init_args.num_synthetic_scenes=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
        ],
        capsys,
    )
    assert re.search(
        r"data fourdgen\.data\.multiview\.MultiViewDataModule: its validation batches have no "
        r"GridBatch\.depth, "
        r"which GridDiffusion needs \(the source view's depth for the projection",
        line,
    ), line
