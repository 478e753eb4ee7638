"""GridVideoWriter (stage 1b outputs): mosaic layout, scene round trip with and without cameras,
videos, shape errors and the Lightning callback entry point."""

from __future__ import annotations

import json
import math
from pathlib import Path

import imageio.v2 as iio
import pytest
import torch

from fourdgen.callbacks.grid import GridVideoWriter, grid_mosaic, placeholder_cameras, write_grid
from fourdgen.data.scene import read_scene
from fourdgen.geometry.cameras import intrinsics_from_fov

V, T, H, W = 3, 4, 6, 8  # odd view count -> a black tile; H != W catches transposed tiles


def _rgb01(v=V, t=T, seed=0):
    return torch.rand(v, t, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _cameras(v=V, t=T):
    """Distinct per-view K and per-cell rigid w2c (rotation about y, moving translation)."""
    K = torch.stack([torch.tensor([[50.0 + i, 0, 4.0], [0, 51.0 + i, 3.0], [0, 0, 1]]) for i in range(v)])
    w2c = torch.eye(4).repeat(v, t, 1, 1)
    for i in range(v):
        for j in range(t):
            a = 0.3 * i + 0.05 * j
            c, s = math.cos(a), math.sin(a)
            w2c[i, j, :3, :3] = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]])
            w2c[i, j, :3, 3] = torch.tensor([0.1 * i, -0.2 * j, 2.0 + i])
    return K, w2c


def _clip(scene_id="s", cameras=True, observed=True, rgb01=None):
    rgb01 = _rgb01() if rgb01 is None else rgb01
    K, w2c = _cameras(rgb01.shape[0], rgb01.shape[1]) if cameras else (None, None)
    clip = {"scene_id": scene_id, "rgb": rgb01 * 2 - 1, "K": K, "w2c": w2c, "caption": "a ball"}
    if observed:
        obs = torch.zeros(rgb01.shape[:2], dtype=torch.bool)
        obs[0, :] = obs[:, 0] = True  # reference row + first column given
        clip["observed"] = obs
    return clip


def _u8(x):
    """[..., 3, H, W] float [0, 1] -> uint8 the way the scene writer quantises."""
    return (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


# --- grid_mosaic -------------------------------------------------------------------------------


def test_mosaic_three_views_tile_2x2_with_one_black_tile():
    rgb = _rgb01()
    m = grid_mosaic(rgb)
    assert m.shape == (T, 2 * H, 2 * W, 3)
    hwc = rgb.permute(0, 1, 3, 4, 2)  # [V, T, H, W, 3]
    torch.testing.assert_close(m[:, :H, :W], hwc[0], rtol=0, atol=0)
    torch.testing.assert_close(m[:, :H, W:], hwc[1], rtol=0, atol=0)
    torch.testing.assert_close(m[:, H:, :W], hwc[2], rtol=0, atol=0)
    assert m[:, H:, W:].abs().max() == 0


@pytest.mark.parametrize(
    ("views", "cols", "grid"),
    [
        (1, None, (1, 1)),
        (4, None, (2, 2)),
        (5, None, (2, 3)),
        (9, None, (3, 3)),
        (4, 4, (1, 4)),
        (5, 2, (3, 2)),
    ],
)
def test_mosaic_layout_places_view_v_at_row_major_tile(views, cols, grid):
    # Each view a constant colour = its index, so every tile is identifiable.
    rgb = torch.arange(1, views + 1, dtype=torch.float32).view(views, 1, 1, 1, 1).expand(views, 2, 3, H, W)
    m = grid_mosaic(rgb, cols=cols)
    rows, c = grid
    assert m.shape == (2, rows * H, c * W, 3)
    for r in range(rows):
        for k in range(c):
            v = r * c + k
            tile = m[:, r * H : (r + 1) * H, k * W : (k + 1) * W]
            assert (tile == (v + 1 if v < views else 0)).all(), (r, k)


def test_mosaic_frame_t_shows_every_view_at_time_t():
    rgb = torch.zeros(2, 3, 3, H, W)
    rgb[:, :] = torch.arange(3, dtype=torch.float32).view(1, 3, 1, 1, 1) / 10  # value = time
    m = grid_mosaic(rgb)
    for t in range(3):
        assert torch.allclose(m[t, :, : 2 * W], torch.tensor(t / 10))


def test_mosaic_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[V, T, 3, H, W\].*\[3, 3, 6, 8\]"):
        grid_mosaic(torch.zeros(3, 3, H, W))


# --- write_grid --------------------------------------------------------------------------------


def test_write_grid_with_cameras_round_trips_through_read_scene(tmp_path):
    clip = _clip(cameras=True)
    out = write_grid(clip, tmp_path, fps=12.0)
    assert out == tmp_path / "s"
    scene = read_scene(out / "scene")
    assert (scene.num_views, scene.num_frames, scene.height, scene.width) == (V, T, H, W)
    assert scene.fps == 12.0 and scene.caption == "a ball"
    rgb01 = (clip["rgb"] + 1) / 2
    for v in range(V):
        assert torch.equal(_u8(scene.load_rgb(v)), _u8(rgb01[v])), f"view {v}"
    torch.testing.assert_close(scene.K, clip["K"], atol=1e-5, rtol=0)
    torch.testing.assert_close(scene.w2c, clip["w2c"], atol=1e-5, rtol=0)
    assert scene.extra["cameras"] == "known"
    assert scene.extra["observed"] == clip["observed"].tolist()


def test_write_grid_without_cameras_writes_flagged_placeholders(tmp_path):
    clip = _clip(cameras=False)
    out = write_grid(clip, tmp_path, default_fov_deg=90.0)
    scene = read_scene(out / "scene")
    assert scene.extra["cameras"] == "unknown"
    assert scene.extra["observed"][0] == [True] * T and scene.extra["observed"][1][1] is False
    K = intrinsics_from_fov(90.0, W, H).float()
    torch.testing.assert_close(scene.K, K.expand(V, 3, 3), atol=1e-5, rtol=0)
    assert scene.K[0, 0, 0].item() == pytest.approx(W / 2)  # 90 deg: fx = W / 2
    torch.testing.assert_close(scene.w2c, torch.eye(4).expand(V, T, 4, 4), atol=1e-5, rtol=0)
    rgb01 = (clip["rgb"] + 1) / 2
    assert torch.equal(_u8(scene.load_rgb(2)), _u8(rgb01[2]))
    pk, pw = placeholder_cameras(V, T, H, W, 90.0)
    torch.testing.assert_close(scene.K, pk)
    torch.testing.assert_close(scene.w2c, pw)


def test_write_grid_without_observed_and_out_of_range_values(tmp_path):
    clip = _clip(cameras=False, observed=False)
    clip["rgb"] = clip["rgb"] * 3  # beyond [-1, 1]: clamped, not wrapped
    clip["rgb"][0, 0, 0, 0, 0] = float("nan")
    scene = read_scene(write_grid(clip, tmp_path) / "scene")
    assert "observed" not in scene.extra
    got = _u8(scene.load_rgb(0))
    assert got[0, 0, 0, 0] == 0  # NaN -> black
    want = _u8(((clip["rgb"] + 1) / 2).nan_to_num(0))[0]
    assert torch.equal(got, want)


def test_write_grid_writes_mosaic_and_view_videos(tmp_path):
    out = write_grid(_clip(), tmp_path, fps=8.0)
    assert sorted(p.name for p in (out / "views").iterdir()) == [f"view_{v:02d}.mp4" for v in range(V)]
    with iio.get_reader(out / "mosaic.mp4", format="FFMPEG") as r:
        assert r.count_frames() == T
        assert tuple(r.get_meta_data()["size"]) == (2 * W, 2 * H)
    with iio.get_reader(out / "views" / "view_01.mp4", format="FFMPEG") as r:
        assert r.count_frames() == T and tuple(r.get_meta_data()["size"]) == (W, H)
    assert not list(out.rglob(".*")), "temporary files left behind"


def test_write_grid_can_skip_videos_and_store_mp4_frames(tmp_path):
    out = write_grid(_clip(), tmp_path, frame_format="mp4", write_views=False, write_mosaic=False)
    assert not (out / "mosaic.mp4").exists() and not (out / "views").exists()
    scene = read_scene(out / "scene")  # checks every view video's frame count and size
    assert isinstance(scene.views[0].rgb, Path) and scene.views[0].rgb.suffix == ".mp4"


@pytest.mark.parametrize(
    ("edit", "field", "expected", "got"),
    [
        (lambda c: c.update(rgb=c["rgb"][0]), "rgb", r"\[V, T, 3, H, W\]", r"\[4, 3, 6, 8\]"),
        (
            lambda c: c.update(rgb=c["rgb"].permute(0, 1, 3, 4, 2)),
            "rgb",
            r"\[V, T, 3, H, W\]",
            r"\[3, 4, 6, 8, 3\]",
        ),
        (lambda c: c.update(rgb=c["rgb"].numpy()), "rgb", r"\[V, T, 3, H, W\]", "ndarray"),
        (lambda c: c.update(K=c["K"][:2]), "K", r"\[3, 3, 3\]", r"\[2, 3, 3\]"),
        (lambda c: c.update(w2c=c["w2c"][:, :1]), "w2c", r"\[3, 4, 4, 4\]", r"\[3, 1, 4, 4\]"),
        (lambda c: c.update(w2c=c["w2c"][:, 0]), "w2c", r"\[3, 4, 4, 4\]", r"\[3, 4, 4\]"),
        (lambda c: c.update(observed=c["observed"].T), "observed", r"\[3, 4\]", r"\[4, 3\]"),
    ],
)
def test_bad_shapes_raise_one_clear_error_before_writing(tmp_path, edit, field, expected, got):
    clip = _clip()
    edit(clip)
    with pytest.raises(ValueError, match=rf"'{field}'.*expected.*{expected}.*got {got}"):
        write_grid(clip, tmp_path)
    assert not any(tmp_path.iterdir()), "nothing is written for a bad clip"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.update(w2c=None), "'K' and 'w2c'.*both"),
        (lambda c: c.pop("scene_id"), "'scene_id'"),
        (lambda c: c["w2c"].__setitem__((0, 0, 0, 0), 2.0), "'w2c'.*rigid"),
        (lambda c: c["K"].__setitem__((1, 0, 0), float("nan")), "'K'.*finite"),
    ],
)
def test_bad_cameras_raise_before_writing(tmp_path, edit, match):
    clip = _clip()
    edit(clip)
    with pytest.raises(ValueError, match=match):
        write_grid(clip, tmp_path)
    assert not any(tmp_path.iterdir())


# --- callback ------------------------------------------------------------------------------------


def test_callback_writes_every_clip_of_a_prediction_list(tmp_path):
    writer = GridVideoWriter(out_dir=str(tmp_path / "pred"), fps=6.0, write_views=False)
    assert writer.interval.on_batch
    prediction = [_clip("a", cameras=True), _clip("b", cameras=False, rgb01=_rgb01(v=2, seed=1))]
    writer.write_on_batch_end(None, None, prediction, [0, 1], None, 0)
    for name, views, cams in (("a", V, "known"), ("b", 2, "unknown")):
        out = tmp_path / "pred" / name
        assert (out / "mosaic.mp4").is_file() and not (out / "views").exists()
        meta = json.loads((out / "scene" / "scene.json").read_text())
        assert meta["cameras"] == cams and meta["fps"] == 6.0 and len(meta["views"]) == views
        assert read_scene(out / "scene").num_views == views


def test_callback_rejects_unknown_frame_format():
    with pytest.raises(ValueError, match="frame_format"):
        GridVideoWriter(frame_format="gif")


# --- source view and its depth (Full-4D) ---------------------------------------------------------


def _depth(seed=0):
    return torch.rand(T, H, W, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5


def test_source_view_and_its_depth_round_trip(tmp_path):
    """The source row is recorded at the top level of scene.json and only it has a depth file."""
    depth = _depth()
    depth[0, 0, 0] = 0.0  # unknown stays 0
    clip = {**_clip(), "source_view": 1, "depth": depth}
    writer = GridVideoWriter(out_dir=str(tmp_path), write_views=False, write_mosaic=False)
    writer.write_on_batch_end(None, None, [clip], [0], None, 0)
    meta = json.loads((tmp_path / "s" / "scene" / "scene.json").read_text())
    assert meta["source_view"] == 1
    assert ["depth" in vm for vm in meta["views"]] == [False, True, False]
    scene = read_scene(tmp_path / "s" / "scene")
    assert scene.source_view == 1 and "source_view" not in scene.extra
    assert [v.depth is not None for v in scene.views] == [False, True, False]
    assert not scene.has_depth  # not every view: loaders that need depth everywhere skip it
    assert torch.equal(scene.load_depth(1), depth) and scene.load_depth(0) is None
    torch.testing.assert_close(scene.K, clip["K"], atol=1e-5, rtol=0)


def test_source_view_without_depth_and_clips_without_either(tmp_path):
    scene = read_scene(write_grid({**_clip("a"), "source_view": 2, "depth": None}, tmp_path) / "scene")
    assert scene.source_view == 2 and all(v.depth is None for v in scene.views)
    scene = read_scene(write_grid({**_clip("b"), "source_view": None, "depth": None}, tmp_path) / "scene")
    assert scene.source_view is None
    assert "source_view" not in json.loads((tmp_path / "b" / "scene" / "scene.json").read_text())


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.update(source_view=3), r"'source_view'.*\[0, 3\).*got 3"),
        (lambda c: c.update(source_view=True), r"'source_view'.*got True"),
        (lambda c: c.update(depth=_depth()[None]), r"'depth'.*\[4, 6, 8\].*got \[1, 4, 6, 8\]"),
        (lambda c: c.update(source_view=None), r"'depth'.*give 'source_view'"),
        (lambda c: c["depth"].__setitem__((0, 0, 0), float("nan")), r"'depth'.*finite"),
    ],
)
def test_bad_source_view_or_depth_raise_before_writing(tmp_path, edit, match):
    clip = {**_clip(), "source_view": 1, "depth": _depth()}
    edit(clip)
    with pytest.raises(ValueError, match=match):
        write_grid(clip, tmp_path)
    assert not any(tmp_path.iterdir())
