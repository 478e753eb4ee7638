"""GridBatch contract and GridDataModule sampling / resizing / splits."""

from __future__ import annotations

import shutil

import pytest
import torch

from fourdgen.batch import GridBatch
from fourdgen.data.datamodules import GridDataModule, GridDataset
from fourdgen.data.synthetic import SyntheticConfig


def _project(x, K, w2c):
    cam = x @ w2c[:3, :3].T + w2c[:3, 3]
    uvw = cam @ K.T
    return uvw[..., :2] / uvw[..., 2:]


def test_dataset_native_resolution_is_exact(tiny_synthetic, tiny_scene_dir):
    ds = GridDataset([tiny_scene_dir], num_views=2, num_frames=3, frame_stride=2)
    b = ds[0].validate()
    assert b.shape == (1, 2, 3, 32, 40)
    assert b.time_ids.tolist() == [[0, 2, 4]] and b.view_ids.tolist() == [[0, 1]]
    torch.testing.assert_close(b.times, torch.tensor([[0.0, 0.4, 0.8]]))
    gt = tiny_synthetic
    torch.testing.assert_close(b.xyz[0, 1, 2].permute(1, 2, 0), gt.xyz[1, 4])
    assert (b.rgb[0, 0, 0].permute(1, 2, 0) - (gt.rgb[0, 0] * 2 - 1)).abs().max() < 2 / 255 + 1e-6
    assert b.observed[0].tolist() == [[True, False, False], [False, False, False]]


@pytest.mark.parametrize("crop", ["center", "random"])
def test_resize_crop_keeps_intrinsics_consistent(tiny_scene_dir, crop):
    """After resize + crop, each pixel's (nearest-resampled) point projects back into that pixel."""
    ds = GridDataset(
        [tiny_scene_dir],
        num_views=1,
        num_frames=1,
        height=24,
        width=24,
        crop=crop,
        random_sampling=crop == "random",
    )
    b = ds[0]
    xyz = b.xyz[0, 0, 0].permute(1, 2, 0)  # [H, W, 3]
    uv = _project(xyz, b.K[0, 0], b.w2c[0, 0, 0])
    v_, u_ = torch.meshgrid(torch.arange(24) + 0.5, torch.arange(24) + 0.5, indexing="ij")
    # Nearest resampling: the source pixel centre is within half a source pixel (scale 32/24).
    err = torch.maximum((uv[..., 0] - u_).abs(), (uv[..., 1] - v_).abs())
    assert err.max() < 0.5 * 24 / 32 + 1e-3


def test_batch_validation_and_collate(tiny_scene_dir):
    ds = GridDataset([tiny_scene_dir], num_views=2, num_frames=2)
    b = GridBatch.collate([ds[0], ds[0]])
    assert b.shape[:3] == (2, 2, 2) and len(b.caption) == 2
    bad = GridBatch.collate([ds[0]])
    bad.K = bad.K[:, :1]
    with pytest.raises(ValueError, match=r"GridBatch.K: expected shape \[1, 2, 3, 3\]"):
        bad.validate()
    moved = b.to(torch.float64)
    assert (
        moved.rgb.dtype == torch.float64
        and moved.view_ids.dtype == torch.long
        and moved.mask.dtype == torch.uint8
    )
    coerced = GridBatch.coerce({"rgb": b.rgb, "K": b.K, "w2c": b.w2c})
    assert coerced.observed.shape == (2, 2, 2) and coerced.times[0, -1] == 1
    with pytest.raises(ValueError, match="unknown fields"):
        GridBatch.coerce({"rgb": b.rgb, "K": b.K, "w2c": b.w2c, "colour": 1})


def test_datamodule_synthetic_and_splits(tmp_path):
    cfg = SyntheticConfig(num_views=3, num_frames=4, height=16, width=16, supersample=1)
    dm = GridDataModule(
        root=str(tmp_path / "scenes"),
        num_views=2,
        num_frames=2,
        height=12,
        width=12,
        synthetic=cfg,
        num_synthetic_scenes=5,
        val_fraction=0.2,
        test_fraction=0.2,
        samples_per_scene=3,
        batch_size=2,
    )
    dm.prepare_data()
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "scenes").glob("*/scene.json")}
    dm.prepare_data()  # reuses identical scenes
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "scenes").glob("*/scene.json")}
    dm.setup("fit")
    assert [len(dm.splits[k]) for k in ("train", "val", "test")] == [3, 1, 1]
    assert not set(dm.splits["train"]) & set(dm.splits["val"] + dm.splits["test"])
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and batches[0].shape == (2, 2, 2, 12, 12)
    val = next(iter(dm.val_dataloader()))
    assert val.shape == (1, 2, 2, 12, 12) and val.view_ids.tolist() == [[0, 1]]


def test_datamodule_errors(tmp_path, tiny_scene_dir):
    dm = GridDataModule(root=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no scene.json"):
        dm.setup("fit")
    shutil.copytree(tiny_scene_dir, tmp_path / "one" / "s")
    with pytest.raises(ValueError, match="needs at least 8 views"):
        GridDataset([tmp_path / "one" / "s"], num_views=8)
    with pytest.warns(UserWarning, match="only 1 scene"):
        GridDataModule(root=str(tmp_path / "one")).setup("fit")
