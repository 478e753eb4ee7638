"""Nothing a user has is replaced without asking: synthetic defaults, exports, checkpoints.

Each test reproduces a data-loss or wrong-score defect a new user hit, and fails without its fix.
"""

from __future__ import annotations

import json
import os
import stat
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from fourdgen.callbacks.checkpoint import ModelCheckpoint
from fourdgen.callbacks.export import Export4DGS
from fourdgen.callbacks.grid import GridVideoWriter
from fourdgen.data.scene_frames import SceneFramesDataModule
from fourdgen.data.synthetic import MARKER, SyntheticConfig, ensure_scene
from fourdgen.errors import ConfigError, OutputExistsError
from fourdgen.gaussians.deformation import DeformationField
from fourdgen.gaussians.densify import BudgetStrategy
from fourdgen.io import MANIFEST, read_manifest
from fourdgen.media import save_video_mp4
from fourdgen.stages.fit import Gaussian4DFitter

SCENE = SyntheticConfig(num_views=3, num_frames=3, height=16, width=16, supersample=1, seed=2)


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------- synthetic default
def test_synthetic_default_never_replaces_a_users_scene(tmp_path, tiny_scene_dir):
    import shutil

    user = tmp_path / "my_scene"
    shutil.copytree(tiny_scene_dir, user)
    meta = json.loads((user / "scene.json").read_text())
    del meta["synthetic"]  # a user's own scene
    (user / "scene.json").write_text(json.dumps(meta))
    before = _snapshot(user)
    with pytest.raises(OutputExistsError, match="did not generate"):
        SceneFramesDataModule(scene=str(user), synthetic=SCENE).prepare_data()
    assert _snapshot(user) == before

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "scene.json").write_text("{not json")
    with pytest.raises(OutputExistsError):
        ensure_scene(broken, SCENE)
    assert (broken / "scene.json").read_text() == "{not json"


def test_synthetic_default_reuses_only_its_own_config(tmp_path):
    root = tmp_path / "s"
    ensure_scene(root, SCENE)
    assert json.loads((root / MARKER).read_text())["seed"] == 2
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    ensure_scene(root, SCENE)  # same config: reused untouched
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    with pytest.raises(OutputExistsError, match="seed: 2 there, 4 asked"):
        ensure_scene(root, SyntheticConfig(**{**SCENE.__dict__, "seed": 4}))
    (tmp_path / "empty").mkdir()
    ensure_scene(tmp_path / "empty", SCENE)  # an empty folder is fine
    assert (tmp_path / "empty" / "scene.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


@pytest.mark.parametrize(
    ("field", "value"), [("num_views", -2), ("num_views", 0), ("height", 0), ("layout", "spiral")]
)
def test_synthetic_config_is_validated(field, value):
    with pytest.raises(ConfigError, match=f"synthetic.{field}"):
        SyntheticConfig(**{field: value})


# --------------------------------------------------------------------------- stage-3 outputs
def _fitter(**kw):
    return Gaussian4DFitter(
        coarse_steps=3,
        init_opacity=0.3,
        lpips_net=None,
        path_samples=4,
        deformation=DeformationField(features=4, resolution=(8, 8, 8, 3), multires=(1,), width=16),
        densify=BudgetStrategy(refine_start_iter=10**6, max_gaussians=500, prune_to=0),
        **kw,
    )


def _dm(tmp_path):
    return SceneFramesDataModule(
        scene=str(tmp_path / "scene"), synthetic=SCENE, holdout_views=[1], init_points=300
    )


def _trainer(tmp_path, steps, overwrite=False, **kw):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=4)
    export = Export4DGS(out_dir=str(tmp_path / "export"), path_samples=3)
    ckpt.overwrite = export.overwrite = overwrite
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[ckpt, export],
        **kw,
    )


def test_last_checkpoint_holds_the_final_step_and_the_export_comes_from_it(tmp_path):
    model = _fitter()
    _trainer(tmp_path, 6).fit(model, _dm(tmp_path))
    last = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6  # Lightning alone leaves step 4 (its interval) here
    assert int(last["state_dict"]["trained_steps"]) == 6
    torch.testing.assert_close(last["state_dict"]["splats.means"], model.splats["means"].detach())
    assert read_manifest(tmp_path / "export") == {"writer": "Export4DGS", "step": 6, "complete": True}


def test_reruns_and_debug_runs_never_replace_a_finished_run(tmp_path):
    _trainer(tmp_path, 6).fit(_fitter(), _dm(tmp_path))
    exported = _snapshot(tmp_path / "export")
    last = (tmp_path / "ck" / "last.ckpt").read_bytes()

    # A new run in the same folders stops before training and says how to resume.
    trainer = _trainer(tmp_path, 6)
    with pytest.raises(OutputExistsError, match="--ckpt_path .*last.ckpt"):
        trainer.fit(_fitter(), _dm(tmp_path))
    assert trainer.global_step == 0
    # A debug run trains a step but leaves the export and the checkpoint alone.
    _trainer(tmp_path, 6, fast_dev_run=True).fit(_fitter(), _dm(tmp_path))
    # A shorter run is refused before any work, even with its checkpoint folder elsewhere.
    short = _trainer(tmp_path / "other", 2)
    next(c for c in short.callbacks if isinstance(c, Export4DGS)).out_dir = tmp_path / "export"
    with pytest.raises(OutputExistsError, match="step 6; this run would replace them with step 2"):
        short.fit(_fitter(), _dm(tmp_path))
    assert _snapshot(tmp_path / "export") == exported
    assert (tmp_path / "ck" / "last.ckpt").read_bytes() == last

    # Resuming continues the run; --overwrite starts over.
    resumed = _trainer(tmp_path, 8)
    resumed.fit(_fitter(), _dm(tmp_path), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert read_manifest(tmp_path / "export")["step"] == 8
    _trainer(tmp_path, 2, overwrite=True).fit(_fitter(), _dm(tmp_path))
    assert read_manifest(tmp_path / "export")["step"] == 2


def test_validate_and_test_score_a_checkpoint_alike(tmp_path):
    """``validate`` runs with global_step 0: the coarse/fine stage must come from the model."""
    model = _fitter()
    _trainer(tmp_path, 6).fit(model, _dm(tmp_path))
    assert model.is_fine
    scores = {}
    for fn in ("validate", "test"):
        fresh = _fitter()
        trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
        )
        out = getattr(trainer, fn)(fresh, _dm(tmp_path), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
        assert fresh.is_fine and trainer.global_step == 0
        scores[fn] = out[0][f"{'val' if fn == 'validate' else 'test'}/psnr"]
    assert scores["validate"] == pytest.approx(scores["test"], abs=1e-6)
    direct = model._eval_batch(next(iter(_dm_ready(tmp_path).val_dataloader())), "val", log=False)
    assert scores["validate"] == pytest.approx(float(direct["psnr"]), abs=1e-4)


def _dm_ready(tmp_path):
    dm = _dm(tmp_path)
    dm.setup()
    return dm


# ------------------------------------------------------------------------ prediction writers
def test_prediction_writers_refuse_folders_they_did_not_write(tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    writer = GridVideoWriter(out_dir=str(out))
    trainer = SimpleNamespace(fast_dev_run=False, is_global_zero=True)
    with pytest.raises(OutputExistsError, match="did not write"):
        writer.on_predict_start(trainer, None)
    writer.overwrite = True  # --overwrite
    writer.on_predict_start(trainer, None)
    writer.on_predict_end(trainer, None)
    assert read_manifest(out)["writer"] == "GridVideoWriter" and (out / "notes.txt").exists()

    again = GridVideoWriter(out_dir=str(out))  # its own earlier outputs: fine
    again.on_predict_start(trainer, None)
    again.on_predict_end(trainer, None)
    debug = GridVideoWriter(out_dir=str(out))
    debug.on_predict_start(SimpleNamespace(fast_dev_run=True, is_global_zero=True), None)
    assert debug._skip  # a debug run writes nothing over existing outputs
    assert (out / MANIFEST).is_file()


def test_mp4_files_get_the_mode_of_other_outputs(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_video_mp4(tmp_path / "v.mp4", torch.rand(2, 8, 8, 3), fps=4)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_fitting_a_grid_with_unknown_cameras_warns(tmp_path):
    root = ensure_scene(tmp_path / "scene", SCENE)
    meta = json.loads((root / "scene.json").read_text())
    (root / "scene.json").write_text(
        json.dumps({**meta, "cameras": "unknown"})
    )  # as GridVideoWriter flags 4RV2
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    dm = SceneFramesDataModule(scene=str(root), holdout_views=[1], init_points=300)
    with pytest.warns(UserWarning, match="cameras are 'unknown'"):
        trainer.fit(_fitter(), dm)


def test_cli_validate_and_test_on_a_checkpoint_agree(tmp_path):
    """Through the CLI as a user runs them: the checkpoint's hyper-parameters parse back, and
    validate scores the fitted (deformed) scene exactly as test does."""
    from fourdgen.cli import FourDGenCLI

    common = [
        "--config=lightning_configs/tiny/fit.yaml",
        f"--data.init_args.scene={tmp_path / 'scene'}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks="
        + json.dumps(
            [
                {
                    "class_path": "fourdgen.callbacks.checkpoint.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ck"), "save_last": True},
                }
            ]
        ),
    ]
    FourDGenCLI(args=["fit", *common, "--trainer.max_steps=4", "--model.init_args.coarse_steps=2"])
    ckpt = f"--ckpt_path={tmp_path / 'ck' / 'last.ckpt'}"
    val = FourDGenCLI(args=["validate", *common, ckpt]).trainer.callback_metrics["val/psnr"]
    test = FourDGenCLI(args=["test", *common, ckpt]).trainer.callback_metrics["test/psnr"]
    assert float(val) == pytest.approx(float(test), abs=1e-6)
