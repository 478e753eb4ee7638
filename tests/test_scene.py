"""Scene format: round trip and every SceneFormatError case."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fourdgen.data.scene import SceneFormatError, find_scenes, read_scene
from fourdgen.data.scene_writer import write_scene


def test_round_trip_png(tiny_synthetic, tiny_scene_dir):
    s = read_scene(tiny_scene_dir)
    gt = tiny_synthetic
    assert (s.num_views, s.num_frames, s.height, s.width) == (4, 6, 32, 40)
    torch.testing.assert_close(s.K, gt.K)
    torch.testing.assert_close(s.w2c, gt.w2c)
    rgb = s.load_rgb(2)
    assert rgb.shape == (6, 3, 32, 40)
    # PNG is 8-bit: exact up to quantisation.
    assert (rgb - gt.rgb[2].permute(0, 3, 1, 2)).abs().max() <= 0.5 / 255 + 1e-6
    torch.testing.assert_close(s.load_depth(1, [0, 3]), gt.depth[1, [0, 3]])
    torch.testing.assert_close(s.load_xyz(3), gt.xyz[3])
    assert torch.equal(s.load_mask(0), gt.mask[0])
    assert s.caption == gt.caption and s.extra["synthetic"]["seed"] == 3


def test_round_trip_mp4_and_static_cameras(tmp_path):
    rng = np.random.default_rng(0)
    V, T, H, W = 2, 5, 16, 24
    rgb = np.tile(np.linspace(0, 255, W, dtype=np.uint8)[None, None, None, :, None], (V, T, H, 1, 3))
    K = torch.tensor([[20.0, 0, 12], [0, 20, 8], [0, 0, 1]]).expand(V, 3, 3)
    w2c = torch.eye(4).expand(V, 4, 4).clone()
    w2c[:, 2, 3] = torch.tensor(rng.uniform(1, 2, V), dtype=torch.float32)
    write_scene(tmp_path / "s", rgb, K, w2c, frame_format="mp4", fps=10)
    meta = json.loads((tmp_path / "s/scene.json").read_text())
    meta["views"][0]["w2c"] = meta["views"][0]["w2c"][0]  # one 4x4 = a static camera
    (tmp_path / "s/scene.json").write_text(json.dumps(meta))
    s = read_scene(tmp_path / "s")
    assert s.w2c.shape == (V, T, 4, 4) and s.fps == 10
    torch.testing.assert_close(s.w2c[0, 3], w2c[0])
    frames = s.load_rgb(1)
    assert frames.shape == (T, 3, H, W)
    assert (frames - torch.from_numpy(rgb[1]).permute(0, 3, 1, 2) / 255).abs().mean() < 0.03  # lossy codec


def test_find_scenes(tmp_path, tiny_scene_dir):
    shutil.copytree(tiny_scene_dir, tmp_path / "b")
    shutil.copytree(tiny_scene_dir, tmp_path / "a")
    assert find_scenes(tmp_path) == [tmp_path / "a", tmp_path / "b"]
    assert find_scenes(tmp_path / "a") == [tmp_path / "a"]


def _broken(tmp_path, tiny_scene_dir, edit):
    root = tmp_path / "broken"
    shutil.copytree(tiny_scene_dir, root)
    meta = json.loads((root / "scene.json").read_text())
    out = edit(meta, root)
    if out != "skip-json":
        (root / "scene.json").write_text(json.dumps(meta) if out is None else out)
    return root


def _set(path, value):
    def edit(meta, root):
        obj = meta
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value

    return edit


def _rigid_break(meta, root):
    meta["views"][1]["w2c"][2][0][0] = 2.0


def _nan(meta, root):
    meta["views"][0]["K"][0][0] = float("nan")


def _missing_frame(meta, root):
    (root / meta["views"][0]["rgb"][3]).unlink()


def _bad_size(meta, root):
    from PIL import Image

    Image.new("RGB", (10, 10)).save(root / meta["views"][2]["rgb"][1])


def _bad_depth(meta, root):
    np.save(root / meta["views"][0]["depth"], np.zeros((6, 32, 41), np.float32))


@pytest.mark.parametrize(
    ("edit", "field", "expected"),
    [
        (lambda m, r: "{not json", "<json>", "valid JSON"),
        (lambda m, r: "[1, 2]", "<root>", "a JSON object"),
        (_set(["width"], -3), "width", "positive integer"),
        (_set(["num_frames"], "six"), "num_frames", "positive integer"),
        (lambda m, r: m.pop("views") and None, "views", "non-empty list"),
        (_set(["fps"], 0), "fps", "positive number"),
        (_set(["format"], "nerf"), "format", "fourdgen-scene"),
        (_set(["views", 0, "K"], [[1, 0], [0, 1]]), "views[0].K", "shape [3, 3]"),
        (_set(["views", 1, "K"], [[-5, 0, 1], [0, 5, 1], [0, 0, 1]]), "views[1].K", "pinhole"),
        (_nan, "views[0].K", "finite"),
        (_set(["views", 0, "w2c"], [[[1, 0, 0, 0]] * 4] * 5), "views[0].w2c", "shape [6, 4, 4]"),
        (_rigid_break, "views[1].w2c[2]", "rigid"),
        (_set(["views", 3, "rgb"], ["rgb/cam03/0000.png"] * 4), "views[3].rgb", "6 frames"),
        (_missing_frame, "views[0].rgb[3]", "existing file"),
        (_set(["views", 0, "rgb"], "rgb/none.mp4"), "views[0].rgb", "existing file"),
        (_set(["views", 0, "rgb"], ["a.gif"] * 6), "views[0].rgb[0]", ".png"),
        (_bad_size, "views[2].rgb[1]", "40x32"),
        (_bad_depth, "views[0].depth", "[6, 32, 40]"),
        (_set(["views", 0, "xyz"], "xyz/missing.npy"), "views[0].xyz", "existing file"),
        (_set(["source_view"], 4), "source_view", "[0, 4)"),
        (_set(["source_view"], -1), "source_view", "[0, 4)"),
        (_set(["source_view"], "0"), "source_view", "integer view index"),
        (_set(["source_view"], True), "source_view", "integer view index"),
        (_set(["source_view"], 1.0), "source_view", "integer view index"),
    ],
)
def test_format_errors(tmp_path, tiny_scene_dir, edit, field, expected):
    root = _broken(tmp_path, tiny_scene_dir, edit)
    with pytest.raises(SceneFormatError) as e:
        read_scene(root)
    assert e.value.field == field, str(e.value)
    assert expected in e.value.expected, str(e.value)
    assert str(root / "scene.json") in str(e.value)


def test_missing_scene_json(tmp_path):
    with pytest.raises(SceneFormatError, match="scene.json"):
        read_scene(tmp_path)


def test_mp4_frame_count_mismatch(tmp_path):
    rgb = np.zeros((1, 4, 16, 16, 3), np.uint8)
    write_scene(
        tmp_path,
        rgb,
        torch.eye(3)[None] * 8 + torch.tensor([[0, 0, 0], [0, 0, 0], [0, 0, -7.0]]),
        torch.eye(4)[None],
        frame_format="mp4",
    )
    meta = json.loads((tmp_path / "scene.json").read_text())
    meta["num_frames"] = 5
    meta["views"][0]["w2c"] = meta["views"][0]["w2c"][0]
    (tmp_path / "scene.json").write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError, match="a video of 5 frames"):
        read_scene(tmp_path)


def test_source_view_is_optional_and_exposed(tmp_path, tiny_scene_dir):
    assert read_scene(tiny_scene_dir).source_view is None
    root = _broken(tmp_path, tiny_scene_dir, _set(["source_view"], 3))
    s = read_scene(root)
    assert s.source_view == 3 and "source_view" not in s.extra


@pytest.mark.parametrize("form", ["list", "dict"])
def test_write_scene_depth_for_some_views_only(tmp_path, tiny_synthetic, form):
    gt = tiny_synthetic
    V = gt.K.shape[0]
    depth = [None] * V
    depth[2] = gt.depth[2]
    given = depth if form == "list" else {2: gt.depth[2]}
    write_scene(tmp_path / "s", gt.rgb, gt.K, gt.w2c, depth=given, mask=gt.mask)
    s = read_scene(tmp_path / "s")
    assert [v.depth is not None for v in s.views] == [v == 2 for v in range(V)]
    assert not s.has_depth and s.has_mask
    torch.testing.assert_close(s.load_depth(2), gt.depth[2])
    assert s.load_depth(0) is None


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"depth": [None, None]}, r"depth: expected 4 per-view entries, got 2"),
        ({"depth": {4: None}}, r"depth: view keys must be ints in \[0, 4\)"),
        ({"depth": [None, torch.zeros(6, 32, 41), None, None]}, r"depth\[1\]: expected \[6, 32, 40\]"),
        ({"xyz": torch.zeros(4, 6, 32, 40)}, r"xyz: expected \[4, 6, 32, 40, 3\]"),
    ],
)
def test_write_scene_rejects_bad_arrays_before_writing(tmp_path, tiny_synthetic, kw, match):
    gt = tiny_synthetic
    with pytest.raises(ValueError, match=match):
        write_scene(tmp_path / "s", gt.rgb, gt.K, gt.w2c, **kw)
    assert not (tmp_path / "s").exists()
