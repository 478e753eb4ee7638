"""4Real-Video-V2's grid augmentations: homography views, static grids, the mixture, the DataModule."""

from __future__ import annotations

import pytest
import torch

from fourdgen.backbones.text import HashTextEncoder
from fourdgen.data.batch import GridBatch
from fourdgen.data.grid_augment import (
    HomographyGrids,
    MixedGrids,
    StaticGrids,
    homography_from_points,
    random_homographies,
    warp_homography,
)
from fourdgen.data.multiview import MultiViewDataModule
from fourdgen.data.synthetic import SyntheticConfig

SYN = SyntheticConfig(num_views=4, num_frames=5, height=24, width=32, seed=2, supersample=1)


def test_warp_reference_cases():
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 3, 12, 16, generator=g)
    same, valid = warp_homography(frames, torch.eye(3))
    torch.testing.assert_close(same, frames, atol=1e-5, rtol=0)
    assert valid.all()
    shift = torch.tensor([[1.0, 0, 3], [0, 1, 2], [0, 0, 1]])  # 3 px right, 2 px down
    out, valid = warp_homography(frames, shift, mode="nearest")
    torch.testing.assert_close(out[:, :, 2:, 3:], frames[:, :, :-2, :-3])
    assert not valid[:, :, :2].any() and not valid[:, :, :, :3].any()
    assert (out[:, :, :2] == -1).all()  # outside the source: black
    H = homography_from_points(
        torch.tensor([[0.0, 0], [16, 0], [16, 12], [0, 12]]),
        torch.tensor([[1.0, 1], [15, 0], [16, 11], [0, 12]]),
    )
    ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(16.0), indexing="ij")
    smooth = (torch.sin(xs / 4) * torch.cos(ys / 3)).expand(1, 3, 12, 16)  # bilinear is exact-ish here
    there, _ = warp_homography(smooth, H)
    back, ok = warp_homography(there, torch.linalg.inv(H))
    interior = ok & (back > -1).all(1, keepdim=True)
    interior[..., :2, :] = interior[..., -2:, :] = interior[..., :2] = interior[..., -2:] = False
    err = (back - smooth).abs()[interior.expand_as(smooth)]
    assert interior.sum() > 80 and err.max() < 0.05


def test_homography_grids_are_synchronized(tiny_scene_dir):
    from fourdgen.data.datamodules import GridDataset

    mono = GridDataset([tiny_scene_dir], num_views=1, num_frames=4)
    ds = HomographyGrids(mono, num_views=3, strength=0.2, seed=7)
    b = ds[0]
    src = mono[0].rgb[0, 0]  # [T, 3, H, W]
    assert b.rgb.shape == (1, 3, 4, 3, *src.shape[-2:])
    torch.testing.assert_close(b.rgb[0, 0], src, atol=1e-5, rtol=0)  # view 0 is the clip
    Hs = random_homographies(3, src.shape[-2], src.shape[-1], 0.2, torch.Generator().manual_seed(7))
    for v in (1, 2):  # one fixed homography per view, the same at every time
        torch.testing.assert_close(b.rgb[0, v], warp_homography(src, Hs[v])[0])
    assert not torch.equal(b.rgb[0, 1], b.rgb[0, 2])
    assert b.observed[0, 0].all() and b.observed[0, :, 0].all() and not b.observed[0, 1:, 1:].any()


def test_static_grids_repeat_one_instant(tiny_scene_dir):
    from fourdgen.data.datamodules import GridDataset

    b = StaticGrids(GridDataset([tiny_scene_dir], num_views=3, num_frames=1), num_frames=5)[0]
    assert b.rgb.shape[:3] == (1, 3, 5)
    assert (b.rgb == b.rgb[:, :, :1]).all() and (b.w2c == b.w2c[:, :, :1]).all()


class _Const(torch.utils.data.Dataset):
    def __init__(self, value, shape=(1, 2, 3, 3, 4, 4)):
        self.value, self.shape = value, shape

    def __len__(self):
        return 3

    def __getitem__(self, i):
        B, V, T = self.shape[:3]
        return GridBatch(
            rgb=torch.full(self.shape, float(self.value)),
            K=torch.eye(3).expand(B, V, 3, 3),
            w2c=torch.eye(4).expand(B, V, T, 4, 4),
            observed=torch.zeros(B, V, T, dtype=torch.bool),
            times=torch.zeros(B, T),
            view_ids=torch.arange(V).expand(B, V),
            time_ids=torch.arange(T).expand(B, T),
        )


def test_mixture_weights_and_shape_check():
    mix = MixedGrids([_Const(0), _Const(1), _Const(2)], [1.0, 0.0, 3.0], length=400, seed=0)
    drawn = torch.tensor([int(mix[i].rgb[0, 0, 0, 0, 0, 0]) for i in range(400)])
    assert (drawn == 1).sum() == 0
    assert 0.65 < (drawn == 2).float().mean() < 0.85
    bad = MixedGrids([_Const(0), _Const(1, shape=(1, 2, 5, 3, 4, 4))], [1, 1], length=50, seed=0)
    with pytest.raises(ValueError, match=r"\(2, 5, 4, 4\)"):
        for i in range(50):
            bad[i]


def test_datamodule_mixes_sources(tmp_path):
    dm = MultiViewDataModule(
        root=str(tmp_path / "scenes"),
        num_views=3,
        num_frames=5,
        height=24,
        width=32,
        crop="center",
        mix=(1.0, 1.0, 1.0),
        text_encoder=HashTextEncoder(dim=8, length=4),
        synthetic=SYN,
        samples_per_scene=12,
        batch_size=2,
    )
    dm.prepare_data()
    dm.setup()
    kinds = set()
    for b in dm.train_dataloader():
        assert b.rgb.shape == (2, 3, 5, 3, 24, 32) and b.text_embeds.shape == (2, 4, 8)
        kinds |= {s.rsplit("_", 1)[-1] for s in b.scene_id}
    assert {"homography", "static"} <= kinds
    val = next(iter(dm.val_dataloader()))
    assert val.depth is not None  # plain grids for validation
    with pytest.raises(ValueError, match="mix"):
        MultiViewDataModule(mix=(0.0, 0.0, 0.0))
