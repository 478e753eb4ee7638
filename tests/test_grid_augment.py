"""4Real-Video-V2's grid augmentations: homography warps and views, static grids, the mixture, the
DataModules that build it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from fourdgen.backbones.text import HashTextEncoder
from fourdgen.batch import GridBatch
from fourdgen.data.augmented_grids import AugmentedGridDataModule
from fourdgen.data.datamodules import GridDataset
from fourdgen.data.grid_augment import (
    HomographyGridDataset,
    MixedGridDataset,
    StaticGridDataset,
    condition_mask,
    homography_from_points,
    image_corners,
    random_homographies,
    static_synthetic_grids,
    warp_homography,
)
from fourdgen.data.multiview import SOURCES, MultiViewDataModule
from fourdgen.data.synthetic import SyntheticConfig, ensure_scene

SYN = SyntheticConfig(num_views=3, num_frames=4, height=16, width=20, num_objects=2, supersample=1, seed=5)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Three small multi-view scenes (3 views x 4 frames, 16 x 20 px) with depth, xyz and masks."""
    root = tmp_path_factory.mktemp("augment") / "scenes"
    return [ensure_scene(root / f"s{i}", dataclasses.replace(SYN, seed=SYN.seed + i)) for i in range(3)]


def _apply(H: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    p = torch.cat([xy, torch.ones_like(xy[:, :1])], -1).double() @ H.double().T
    return p[:, :2] / p[:, 2:]


def _reference_warp(img: torch.Tensor, H: torch.Tensor, mode: str, fill: float) -> torch.Tensor:
    """Per-pixel loop: output pixel centre -> H^-1 -> source; border-clamped nearest / bilinear."""
    C, h, w = img.shape
    out = torch.full_like(img, fill)
    Hinv = torch.linalg.inv(H.double())
    for j in range(h):
        for i in range(w):
            x, y = _apply(Hinv, torch.tensor([[i + 0.5, j + 0.5]]))[0].tolist()
            if not (0 <= x <= w and 0 <= y <= h):
                continue
            if mode == "nearest":
                out[:, j, i] = img[:, min(int(y), h - 1), min(int(x), w - 1)]
                continue
            fx, fy = min(max(x - 0.5, 0.0), w - 1.0), min(max(y - 0.5, 0.0), h - 1.0)  # pixel-index coords
            x0, y0 = int(fx), int(fy)
            x1, y1, ax, ay = min(x0 + 1, w - 1), min(y0 + 1, h - 1), fx - x0, fy - y0
            top = img[:, y0, x0] * (1 - ax) + img[:, y0, x1] * ax
            bottom = img[:, y1, x0] * (1 - ax) + img[:, y1, x1] * ax
            out[:, j, i] = top * (1 - ay) + bottom * ay
    return out


# ------------------------------------------------------------------------------ warps
def test_warp_identity_and_integer_shift():
    frames = torch.rand(2, 3, 12, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same, valid = warp_homography(frames, torch.eye(3))
    torch.testing.assert_close(same, frames, atol=1e-5, rtol=0)
    assert valid.all()
    shift = torch.tensor([[1.0, 0, 3], [0, 1, 2], [0, 0, 1]])  # 3 px right, 2 px down
    expected_valid = torch.zeros(2, 1, 12, 16, dtype=torch.bool)
    expected_valid[..., 2:, 3:] = True
    for mode in ("bilinear", "nearest"):
        out, valid = warp_homography(frames, shift, mode=mode)
        torch.testing.assert_close(out[..., 2:, 3:], frames[..., :-2, :-3], atol=1e-5, rtol=0)
        assert torch.equal(valid, expected_valid)
        assert (out[..., :2, :] == -1).all() and (out[..., :3] == -1).all()  # outside: black
    ids = torch.randint(1, 255, (1, 1, 12, 16), dtype=torch.uint8)
    out, _ = warp_homography(ids, shift, mode="nearest", fill=0)
    assert out.dtype == torch.uint8 and torch.equal(out[..., 2:, 3:], ids[..., :-2, :-3])
    assert (out[..., :2, :] == 0).all()


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_warp_matches_per_pixel_reference(mode):
    img = torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(1))
    H = homography_from_points(
        image_corners(9, 11), torch.tensor([[1.3, 0.7], [10.2, 1.1], [11.6, 8.1], [0.4, 9.9]])
    )
    out, valid = warp_homography(img[None], H, mode=mode, fill=-1.0)
    ref = _reference_warp(img, H, mode, -1.0)
    assert 0 < valid.sum() < valid.numel()
    torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=0)
    # One homography per frame ([N, 3, 3]) == one call per frame.
    Hs = torch.stack([H, torch.linalg.inv(H)])
    frames = torch.stack([img, img.flip(-1)])
    batched, _ = warp_homography(frames, Hs, mode=mode)
    for n in range(2):
        torch.testing.assert_close(batched[n], warp_homography(frames[n : n + 1], Hs[n], mode=mode)[0][0])


def test_warp_round_trip_on_interior():
    ys, xs = torch.meshgrid(torch.arange(24.0), torch.arange(32.0), indexing="ij")
    smooth = torch.stack([torch.sin(xs / 5) * torch.cos(ys / 4), torch.cos(xs / 6), torch.sin(ys / 5)])[None]
    H = random_homographies(2, 24, 32, 0.1, torch.Generator().manual_seed(3))[1]
    there, _ = warp_homography(smooth, H)
    back, ok = warp_homography(there, torch.linalg.inv(H))
    interior = ok & (back > -1).all(1, keepdim=True)  # away from the first warp's black border
    # ... and 2 px further in (padding counts as outside: erosion of the zero-padded mask)
    interior = -F.max_pool2d(-F.pad(interior.float(), (2, 2, 2, 2)), 5, 1) > 0
    assert interior.sum() > 0.5 * 24 * 32
    assert (back - smooth).abs()[interior.expand_as(smooth)].max() < 0.03


def test_random_homographies_bounds_and_sweep():
    V, h, w, s = 6, 24, 32, 0.2
    Hs = random_homographies(V, h, w, s, torch.Generator().manual_seed(4))
    assert Hs.shape == (V, 3, 3) and torch.equal(Hs[0], torch.eye(3))
    torch.testing.assert_close(Hs, random_homographies(V, h, w, s, torch.Generator().manual_seed(4)))
    corners, size = image_corners(h, w).double(), torch.tensor([w, h], dtype=torch.float64)
    moved = torch.stack([_apply(H, corners) for H in Hs])  # [V, 4, 2]
    assert ((moved - corners).abs() <= s * size + 1e-4).all()
    # Sweep: |d offset / d s| <= 2, so neighbouring views move corners by <= 2 / (V - 1) of the bound.
    assert ((moved[1:] - moved[:-1]).abs() <= 2 / (V - 1) * s * size + 1e-4).all()
    assert not torch.allclose(Hs[1], Hs[2])
    indep = random_homographies(V, h, w, s, torch.Generator().manual_seed(4), sweep=False)
    assert torch.equal(indep[0], torch.eye(3)) and not torch.allclose(indep, Hs)
    with pytest.raises(ValueError, match="strength"):
        random_homographies(2, h, w, 0.3)


# ------------------------------------------------------------------------------ datasets
def test_homography_views_are_synchronized(scenes):
    mono = GridDataset(scenes[:1], num_views=1, num_frames=4)  # condition first_frame: cell (0, 0)
    ds = HomographyGridDataset(mono, num_views=3, strength=0.2, condition="first_time", seed=7)
    b, src = ds[0], mono[0]
    assert b.shape == (1, 3, 4, 16, 20) and all(getattr(b, k) is not None for k in ("depth", "xyz", "mask"))
    for k in ("rgb", "depth", "xyz", "mask"):  # view 0 is the clip itself
        assert torch.equal(getattr(b, k)[:, 0], getattr(src, k)[:, 0])
    Hs = ds.homographies(0, 16, 20)
    for v in (1, 2):  # view v at time t == frame t warped by H_v: the same H at every time
        for t in range(4):
            torch.testing.assert_close(b.rgb[0, v, t], warp_homography(src.rgb[0, 0, t][None], Hs[v])[0][0])
            depth = warp_homography(src.depth[0, 0, t][None], Hs[v], "nearest", 0.0)[0][0]
            assert torch.equal(b.depth[0, v, t], depth)
        assert (b.depth[0, v] == 0).any() and (b.rgb[0, v] == -1).any()  # outside the source image
    assert not torch.equal(b.rgb[0, 1], b.rgb[0, 2])
    # Cameras are the source's (not meaningful), observed = base row on view 0 OR first_time.
    assert torch.equal(b.K, src.K.expand(1, 3, 3, 3)) and torch.equal(b.w2c, src.w2c.expand(1, 3, 4, 4, 4))
    assert b.observed[0].tolist() == [[True, False, False, False]] * 3
    assert b.view_ids.tolist() == [[0, 1, 2]] and torch.equal(b.time_ids, src.time_ids)
    assert b.scene_id == [f"{scenes[0].name}_homography"]
    assert torch.equal(ds[0].rgb, b.rgb)  # seeded: deterministic per index
    torch.manual_seed(0)
    fresh = HomographyGridDataset(mono, num_views=3, strength=0.2)
    assert not torch.equal(fresh[0].rgb, fresh[0].rgb)  # unseeded: new homographies every draw
    with pytest.raises(ValueError, match="expected a single-view clip"):
        HomographyGridDataset(GridDataset(scenes[:1], num_views=2, num_frames=2), 3)[0]


def test_static_grid_repeats_one_instant(scenes, tmp_path):
    base = GridDataset(scenes[:1], num_views=3, num_frames=1)  # condition first_frame: cell (0, 0)
    b = StaticGridDataset(base, num_frames=5, condition="first_view")[0]
    assert b.shape == (1, 3, 5, 16, 20)
    for k in ("rgb", "depth", "xyz", "mask", "w2c"):
        x = getattr(b, k)
        assert torch.equal(x, x[:, :, :1].expand_as(x)), k
    assert torch.equal(b.rgb[:, :, 0], base[0].rgb[:, :, 0]) and torch.equal(b.K, base[0].K)
    assert b.times.tolist() == [[0.0] * 5] and b.time_ids.tolist() == [[0] * 5]
    assert b.observed[0].tolist() == [[True] * 5, [False] * 5, [False] * 5]
    assert b.scene_id == [f"{scenes[0].name}_static"]

    syn = static_synthetic_grids(tmp_path, SYN, num_frames=3, num_scenes=2, num_views=3)
    s = syn[1]
    assert len(syn) == 2 and s.shape == (1, 3, 3, 16, 20)
    assert torch.equal(s.rgb, s.rgb[:, :, :1].expand_as(s.rgb))
    assert not torch.equal(s.w2c[0, 0], s.w2c[0, 1])  # an orbit of cameras around one instant
    assert json.loads((tmp_path / "static_001" / "scene.json").read_text())["num_frames"] == 1


class _Const(torch.utils.data.Dataset):
    """Grids filled with ``value`` (the source's id), of ``shape`` [1, V, T, 3, H, W]."""

    def __init__(self, value, shape=(1, 2, 3, 3, 4, 4), depth=False):
        self.value, self.shape, self.depth = value, shape, depth

    def __len__(self):
        return 3

    def __getitem__(self, i):
        B, V, T, _, H, W = self.shape
        return GridBatch(
            rgb=torch.full(self.shape, float(self.value)),
            K=torch.eye(3).expand(B, V, 3, 3),
            w2c=torch.eye(4).expand(B, V, T, 4, 4),
            observed=torch.zeros(B, V, T, dtype=torch.bool),
            times=torch.zeros(B, T),
            view_ids=torch.arange(V).expand(B, V),
            time_ids=torch.arange(T).expand(B, T),
            depth=torch.ones(B, V, T, 1, H, W) if self.depth else None,
        )


def test_mixture_respects_weights():
    mix = MixedGridDataset([_Const(0), _Const(1), _Const(2)], [1.0, 0.0, 3.0], length=2000, seed=0)
    drawn = torch.tensor([mix.draw(i)[0] for i in range(2000)])
    assert (drawn == 1).sum() == 0  # weight 0: never drawn
    assert abs((drawn == 2).float().mean() - 0.75) < 0.04
    assert [int(mix[i].rgb.flatten()[0]) for i in range(20)] == drawn[:20].tolist()
    again = MixedGridDataset([_Const(0), _Const(1), _Const(2)], [1.0, 0.0, 3.0], length=2000, seed=0)
    assert [again.draw(i) for i in range(50)] == [mix.draw(i) for i in range(50)]
    with pytest.raises(ValueError, match="non-negative weight"):
        MixedGridDataset([_Const(0), _Const(1)], [1.0, -1.0], length=4)


def test_mixture_shape_and_field_mismatch():
    with pytest.raises(
        ValueError,
        match=r"source 1 yields grids \(V, T, H, W\) = \(2, 5, 4, 4\), but source 0 yields \(2, 3, 4, 4\)",
    ):
        MixedGridDataset([_Const(0), _Const(1, shape=(1, 2, 5, 3, 4, 4))], [1, 1], length=4)
    # A disabled source is not checked.
    MixedGridDataset([_Const(0), _Const(1, shape=(1, 2, 5, 3, 4, 4))], [1, 0], length=4)
    with pytest.raises(ValueError, match=r"source 1 \('b'\) has optional fields \['depth'\]"):
        MixedGridDataset([_Const(0), _Const(1, depth=True)], [1, 1], length=4, names=["a", "b"])


# ------------------------------------------------------------------------------ DataModules
def test_augmented_datamodule_batches(tmp_path):
    dm = AugmentedGridDataModule(
        root=str(tmp_path / "scenes"),
        num_views=2,
        num_frames=3,
        height=12,
        width=16,
        weights=(1.0, 1.0, 1.0),
        train_length=24,
        synthetic=SYN,
        num_synthetic_scenes=3,
        batch_size=2,
    )
    assert dm.hparams.weights == [1.0, 1.0, 1.0] and dm.hparams.monocular_view == 0
    assert isinstance(dm.hparams.synthetic, dict) and dm.hparams.num_views == 2
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 12
    kinds = set()
    for b in batches:
        assert isinstance(b, GridBatch) and b.shape == (2, 2, 3, 12, 16)
        assert b.depth.shape == (2, 2, 3, 1, 12, 16) and b.mask.dtype == torch.uint8
        kinds |= {
            s.rsplit("_", 1)[-1] if s.endswith(("_homography", "_static")) else "grid" for s in b.scene_id
        }
    assert kinds == {"grid", "homography", "static"}
    val = next(iter(dm.val_dataloader()))  # plain multi-view grids
    assert val.shape == (1, 2, 3, 12, 16) and val.view_ids.tolist() == [[0, 1]]
    assert val.scene_id[0].startswith("synth_") and not val.scene_id[0].endswith(("_homography", "_static"))


def test_augmented_datamodule_sources(tmp_path, scenes):
    mono_root = tmp_path / "mono"
    ensure_scene(mono_root / "clip", dataclasses.replace(SYN, num_views=1, seed=9))
    kw = dict(root=str(scenes[0].parent), num_views=3, num_frames=4, batch_size=2, train_length=4)
    dm = AugmentedGridDataModule(weights=(0.0, 1.0, 0.0), monocular_root=str(mono_root), **kw)
    dm.setup("fit")
    mix = dm.train_dataset()
    assert mix.names == ["homography"]  # weight 0: disabled
    for b in dm.train_dataloader():
        assert b.shape == (2, 3, 4, 16, 20) and b.scene_id == ["clip_homography"] * 2
        assert b.observed[0].tolist() == [
            [True] * 4,
            [True, False, False, False],
            [True, False, False, False],
        ]
    static = AugmentedGridDataModule(weights=(0.0, 0.0, 1.0), **kw)
    static.setup("fit")
    b = static.train_dataset()[0]
    assert b.time_ids.tolist() == [[0] * 4] and torch.equal(b.rgb, b.rgb[:, :, :1].expand_as(b.rgb))
    with pytest.raises(ValueError, match="weights"):
        AugmentedGridDataModule(weights=(0.0, 0.0, 0.0))
    # static copies from another dataset (stage 2's static scenes mixed into dynamic training)
    other = ensure_scene(tmp_path / "static" / "still", dataclasses.replace(SYN, seed=11))
    static = AugmentedGridDataModule(weights=(0.0, 0.0, 1.0), static_root=str(other.parent), **kw)
    static.setup("fit")
    assert static.train_dataset()[0].scene_id == ["still_static"]
    bad = AugmentedGridDataModule(weights=(0.0, 0.0, 1.0), static_root=str(tmp_path / "none"), **kw)
    bad.setup("fit")
    with pytest.raises(FileNotFoundError, match="static_root"):
        bad.train_dataset()


@pytest.mark.filterwarnings("ignore:.*only 1 scene")
def test_multiview_datamodule_mix_uses_these_datasets(tmp_path):
    """MultiViewDataModule(mix=...) builds its mixture from this module's datasets ."""
    dm = MultiViewDataModule(
        root=str(tmp_path / "scenes"),
        num_views=3,
        num_frames=4,
        height=16,
        width=20,
        crop="center",
        mix=(1.0, 1.0, 1.0, 1.0),
        text_encoder=HashTextEncoder(dim=8, length=4),
        synthetic=SYN,
        samples_per_scene=12,
        batch_size=2,
    )
    dm.prepare_data()
    dm.setup()
    torch.manual_seed(0)
    kinds = set()
    for b in dm.train_dataloader():
        assert b.rgb.shape == (2, 3, 4, 3, 16, 20) and b.text_embeds.shape == (2, 4, 8)
        kinds |= {s.rsplit("_", 1)[-1] for s in b.scene_id}
    assert {"homography", "static"} <= kinds


def _mv(root, **kw):
    kw = {"num_views": 3, "num_frames": 4, "height": 16, "width": 20, "crop": "center", **kw}
    return MultiViewDataModule(root=str(root), text_encoder=HashTextEncoder(dim=8, length=4), **kw)


def test_multiview_mix_draws_the_papers_four_sources(tmp_path, scenes):
    """Appendix B: 40% synthetic multi-view (Objaverse), 20% Kubric, 20% 2D-homography and 20% static
    grids; the Kubric share reads its own scenes (``kubric_root``)."""
    kubric = ensure_scene(tmp_path / "kubric" / "k0", dataclasses.replace(SYN, seed=21))
    dm = _mv(scenes[0].parent, mix=(0.4, 0.2, 0.2, 0.2), kubric_root=str(kubric.parent), samples_per_scene=4)
    dm.setup()
    mix = dm._dataset("train").base
    assert mix.names == list(SOURCES) == ["multiview", "kubric", "homography", "static"]
    torch.manual_seed(0)
    drawn = torch.tensor([mix.draw(i)[0] for i in range(4000)])
    shares = torch.bincount(drawn, minlength=4).float() / len(drawn)
    torch.testing.assert_close(shares, torch.tensor([0.4, 0.2, 0.2, 0.2]), atol=0.03, rtol=0)
    ids = {mix.datasets[1][i].scene_id[0] for i in range(4)}
    assert ids == {"k0"}  # the Kubric source: its own scenes
    assert {mix.datasets[0][i].scene_id[0] for i in range(12)} <= {p.name for p in scenes}
    same = _mv(scenes[0].parent, mix=(0.0, 1.0, 0.0, 0.0))  # no kubric_root: the training scenes
    same.setup()
    assert same._dataset("train").base.datasets[0][0].scene_id[0] in {p.name for p in scenes}
    missing = _mv(scenes[0].parent, mix=(0.0, 1.0, 0.0, 0.0), kubric_root=str(tmp_path / "none"))
    missing.setup()
    with pytest.raises(FileNotFoundError, match="kubric_root"):
        missing._dataset("train")
    with pytest.raises(ValueError, match="4 non-negative shares"):
        _mv(scenes[0].parent, mix=(0.4, 0.4, 0.2))  # the old three-source form


def test_static_grids_drop_frame_conditioning(scenes):
    """Appendix B: freeze-time (static) grids are trained without frame conditioning (no given
    cells); the other sources keep ``condition``. ``static_condition`` can give them cells."""
    dm = _mv(scenes[0].parent, mix=(1.0, 0.0, 1.0, 1.0), samples_per_scene=4)
    dm.setup()
    mix = dm._dataset("train").base
    static, homography, grids = mix.datasets[2][0], mix.datasets[1][0], mix.datasets[0][0]
    assert torch.equal(static.time_ids, static.time_ids[:, :1].expand_as(static.time_ids))  # one instant
    assert torch.equal(static.rgb, static.rgb[:, :, :1].expand_as(static.rgb))
    assert torch.equal(static.observed, torch.zeros(1, 3, 4, dtype=torch.bool))
    given = condition_mask(3, 4, "first_view+first_time")[None]
    assert torch.equal(homography.observed, given) and torch.equal(grids.observed, given)
    kept = _mv(scenes[0].parent, mix=(0.0, 0.0, 0.0, 1.0), static_condition="first_view+first_time")
    kept.setup()
    assert torch.equal(kept._dataset("train")[0].observed, given)
