"""Importers: files written in each format's documented layout from known cameras come back as
scenes whose OpenCV cameras project a known point to the same pixel as the format's own formula,
with the same frames; malformed files name the file and the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fourdgen.data.scene import SceneFormatError, read_scene
from fourdgen.importers import colmap, dycheck, n3dv, nerfstudio
from fourdgen.main import main
from tests import dataset_layouts as L

H, W = 24, 32


def _scene_pixel(scene, v, t=0):
    return L.project_opencv(scene.K[v].double().numpy(), scene.w2c[v, t].double().numpy())


def _frames(scene, v):
    return (scene.load_rgb(v).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def test_nerfstudio_static_views_per_frame_intrinsics(tmp_path):
    K, w2c = L.known_cameras(3, W, H)
    imgs = L.frames(3, H, W)
    L.write_transforms(tmp_path / "ns", K, w2c, imgs, per_frame_intrinsics=True)
    (dst,) = nerfstudio.import_scene(tmp_path / "ns", tmp_path / "scene")
    scene = read_scene(dst)
    assert (scene.num_views, scene.num_frames) == (3, 1)
    for v in range(3):
        want = L.project_gl(K[v, 0, 0], K[v, 1, 1], K[v, 0, 2], K[v, 1, 2], L.gl_c2w(w2c[v]))
        np.testing.assert_allclose(_scene_pixel(scene, v), want, atol=1e-4)
        np.testing.assert_array_equal(_frames(scene, v)[0], imgs[v])


def test_dnerf_time_is_a_monocular_video(tmp_path):
    K, w2c = L.known_cameras(4, W, H)
    K[:] = K[0]  # one camera over time
    imgs = L.frames(4, H, W, seed=1)
    times = [0.75, 0.0, 0.5, 0.25]
    L.write_transforms(tmp_path / "dnerf", K, w2c, imgs, times=times, name="transforms_train.json")
    (dst,) = nerfstudio.import_scene(tmp_path / "dnerf", tmp_path / "scene")
    scene = read_scene(dst)
    assert (scene.num_views, scene.num_frames) == (1, 4)
    assert scene.extra["times"] == sorted(times)
    order = np.argsort(times)
    for t, i in enumerate(order):
        want = L.project_gl(K[i, 0, 0], K[i, 1, 1], K[i, 0, 2], K[i, 1, 2], L.gl_c2w(w2c[i]))
        np.testing.assert_allclose(_scene_pixel(scene, 0, t), want, atol=1e-4)
    np.testing.assert_array_equal(_frames(scene, 0), imgs[order])


def test_nerfstudio_malformed(tmp_path):
    K, w2c = L.known_cameras(2, W, H)
    file = L.write_transforms(tmp_path / "ns", K, w2c, L.frames(2, H, W))
    meta = json.loads(file.read_text())
    del meta["frames"][1]["transform_matrix"]
    file.write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError, match=r"transforms\.json: field 'frames\[1\]\.transform_matrix'"):
        nerfstudio.import_scene(file, tmp_path / "a")
    meta["frames"][1]["transform_matrix"] = (2 * np.eye(4)).tolist()  # scaled: not a rigid pose
    file.write_text(json.dumps(meta))
    with pytest.raises(
        SceneFormatError, match=r"field 'frames\[1\]\.transform_matrix': expected a rigid pose"
    ):
        nerfstudio.import_scene(file, tmp_path / "b")


@pytest.mark.parametrize("binary", [True, False])
def test_colmap_model(tmp_path, binary):
    K, w2c = L.known_cameras(3, W, H)
    imgs = L.frames(3, H, W, seed=2)
    recs = L.write_colmap(tmp_path / "colmap", K, w2c, imgs, binary=binary)
    (dst,) = colmap.import_scene(tmp_path / "colmap", tmp_path / "scene")
    scene = read_scene(dst)
    assert scene.extra["image_names"] == ["img_000.png", "img_001.png", "img_002.png"]  # sorted by name
    for v, (params, q, t) in enumerate(recs):
        uv = L.project_colmap(params, q, t)
        np.testing.assert_allclose(_scene_pixel(scene, v), uv, atol=1e-4)
        np.testing.assert_array_equal(_frames(scene, v)[0], imgs[v])
        # The sparse points become depth: POINT lands in its pixel at its z; the point behind it on
        # view 0's ray (same pixel) loses to it; nothing else is drawn.
        depth = scene.load_depth(v)[0].numpy()
        z = (w2c[v, :3, :3] @ L.POINT + w2c[v, :3, 3])[2]
        assert depth[int(uv[1]), int(uv[0])] == pytest.approx(z, rel=1e-6) and (depth > 0).sum() == 1


def test_colmap_malformed(tmp_path):
    K, w2c = L.known_cameras(2, W, H)
    L.write_colmap(tmp_path / "c", K, w2c, L.frames(2, H, W))
    f = tmp_path / "c" / "sparse" / "0" / "images.bin"
    f.write_bytes(f.read_bytes()[:-30])  # cut inside the last image's points
    with pytest.raises(SceneFormatError, match=r"images\.bin: field 'images\[1\]\.points2D'"):
        colmap.import_scene(tmp_path / "c", tmp_path / "a")
    L.write_colmap(tmp_path / "t", K, w2c, L.frames(2, H, W), binary=False)
    f = tmp_path / "t" / "sparse" / "0" / "cameras.txt"
    f.write_text(f.read_text().replace("PINHOLE", "PINHOLE_TYPO", 1))
    with pytest.raises(SceneFormatError, match=r"cameras\.txt: field 'line 3\.MODEL'"):
        colmap.import_scene(tmp_path / "t", tmp_path / "b")


def _n3dv(root, n=3, T=3):
    K, w2c = L.known_cameras(n, W, H)
    K[:, 0, 0] = K[:, 1, 1] = 25.0  # LLFF: one focal length, centred principal point
    K[:, 0, 2], K[:, 1, 2] = W / 2, H / 2
    rows = L.llff_rows(K, w2c, H, W)
    root.mkdir(parents=True)
    np.save(root / "poses_bounds.npy", rows)
    yy, xx = np.mgrid[0:H, 0:W]
    ramp = np.stack([xx * 4, yy * 5, xx + yy], -1) + 40  # smooth: H.264 keeps it within a few levels
    videos = np.stack([np.broadcast_to(ramp + 30 * v, (T, H, W, 3)) for v in range(n)]).astype(np.uint8)
    from fourdgen.data.scene_writer import write_video

    for v in range(n):
        write_video(root / f"cam{v:02d}.mp4", videos[v], fps=30)
    return rows, videos


def test_n3dv_llff_poses_and_videos(tmp_path):
    rows, videos = _n3dv(tmp_path / "n3dv")
    (dst,) = n3dv.import_scene(tmp_path / "n3dv", tmp_path / "scene")
    scene = read_scene(dst)
    assert (scene.num_views, scene.num_frames) == (3, 3)
    assert scene.extra["holdout_views"] == [0] and [v.name for v in scene.views] == [
        "cam00",
        "cam01",
        "cam02",
    ]
    for v in range(3):
        np.testing.assert_allclose(_scene_pixel(scene, v, 2), L.project_llff(rows[v]), atol=1e-4)
        assert np.abs(_frames(scene, v).astype(int) - videos[v]).mean() < 3  # mp4 is lossy
    (small,) = n3dv.import_scene(tmp_path / "n3dv", tmp_path / "half", downscale_factor=2, max_frames=2)
    half = read_scene(small)
    assert (half.width, half.height, half.num_frames) == (W // 2, H // 2, 2)
    np.testing.assert_allclose(_scene_pixel(half, 1), L.project_llff(rows[1]) / 2, atol=1e-4)


def test_n3dv_malformed(tmp_path):
    _n3dv(tmp_path / "n3dv", n=2, T=2)
    np.save(tmp_path / "n3dv" / "poses_bounds.npy", np.zeros((2, 15)))
    with pytest.raises(
        SceneFormatError, match=r"poses_bounds\.npy: field '<array>': expected shape \[N, 17\]"
    ):
        n3dv.import_scene(tmp_path / "n3dv", tmp_path / "a")
    np.save(tmp_path / "n3dv" / "poses_bounds.npy", np.zeros((3, 17)))
    with pytest.raises(SceneFormatError, match="2 rows, one per camera"):
        n3dv.import_scene(tmp_path / "n3dv", tmp_path / "b")


def _iphone(root, covisible=True):
    K, w2c = L.known_cameras(5, W, H)
    imgs = L.frames(5, H, W, seed=4)
    train = [(f"0_{t:05d}", 0, t, K[0], w2c[t], imgs[t]) for t in range(3)]
    depth = {f"0_{t:05d}": np.full((H, W), 1.5 + t) for t in range(3)}
    val = [(f"1_{t:05d}", 1, t, K[3], w2c[3], imgs[3]) for t in (0, 2)]
    val += [(f"2_{t:05d}", 2, t, K[4], w2c[4], imgs[4]) for t in (1,)]
    return L.write_dycheck(root, train, val, W, H, covisible=covisible, depth=depth), imgs


def test_dycheck_iphone_splits_and_covisibility(tmp_path):
    cams, imgs = _iphone(tmp_path / "apple")
    out = dycheck.import_scene(tmp_path / "apple", tmp_path / "scene")
    assert [p.name for p in out] == ["train", "val_1", "val_2"]
    train, val1 = read_scene(out[0]), read_scene(out[1])
    assert (train.num_views, train.num_frames, train.fps) == (1, 3, 15.0)
    assert train.extra["time_ids"] == [0, 1, 2] and "covisible" not in train.extra
    for t in range(3):
        np.testing.assert_allclose(
            _scene_pixel(train, 0, t), L.project_nerfies(cams[f"0_{t:05d}"]), atol=1e-4
        )
    np.testing.assert_array_equal(_frames(train, 0), imgs[:3])
    np.testing.assert_array_equal(train.load_depth(0)[:, 0, 0].numpy(), [1.5, 2.5, 3.5])  # lidar depth
    assert val1.views[0].depth is None
    assert val1.extra["time_ids"] == [0, 2] and val1.extra["frame_names"] == [["1_00000", "1_00002"]]
    np.testing.assert_allclose(_scene_pixel(val1, 0, 1), L.project_nerfies(cams["1_00002"]), atol=1e-4)
    cov = np.load(val1.root / val1.extra["covisible"][0])
    assert cov.shape == (2, H, W) and cov[:, :, : W // 2].all() and not cov[:, :, W // 2 :].any()


def test_dycheck_malformed(tmp_path):
    _iphone(tmp_path / "seq", covisible=False)
    f = tmp_path / "seq" / "camera" / "0_00001.json"
    cam = json.loads(f.read_text())
    del cam["focal_length"]
    f.write_text(json.dumps(cam))
    with pytest.raises(SceneFormatError, match=r"0_00001\.json: field 'focal_length'"):
        dycheck.import_scene(tmp_path / "seq", tmp_path / "a")


def test_import_command_one_line_error_and_refuses_foreign_folder(tmp_path, capsys):
    K, w2c = L.known_cameras(2, W, H)
    L.write_transforms(tmp_path / "ns", K, w2c, L.frames(2, H, W))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    args = ["import", "nerfstudio", str(tmp_path / "ns")]
    with pytest.raises(SystemExit) as e:
        main(args + [str(tmp_path / "taken")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("fourdgen: error:") and "--overwrite" in err
    assert len(err.strip().splitlines()) == 2  # the message + the --debug hint
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    main(args + [str(tmp_path / "new"), "--downscale", "2"])
    assert "wrote" in capsys.readouterr().out
    assert (read_scene(tmp_path / "new").width, read_scene(tmp_path / "new").num_views) == (W // 2, 2)


def test_importers_and_evaluation_sit_on_top():
    """Layers point down: only the console entry (and evaluation, for DyCheck's split reader)
    import ``fourdgen.importers``; only the entry imports ``fourdgen.evaluation``."""
    import ast
    from pathlib import Path

    import fourdgen

    pkg = Path(fourdgen.__file__).parent
    allowed = {
        "fourdgen.importers": ("importers", "evaluation", "main.py"),
        "fourdgen.evaluation": ("evaluation", "main.py"),
    }
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                for top, ok in allowed.items():
                    if name.startswith(top):
                        assert rel.startswith(ok), f"{rel} imports {name}"
