"""``fourdgen eval`` protocols on data written in each benchmark's layout: ground-truth readers
against known values, and each table's numbers against a numpy reference or an exact answer.
The benchmarks/eval_*.py scripts run here on the same data."""

from __future__ import annotations

import json
import runpy
import sys

import imageio.v2 as iio
import numpy as np
import pytest
import torch

from fourdgen.data.scene import SceneFormatError
from fourdgen.data.scene_writer import write_scene
from fourdgen.evaluation.cameras import PROTOCOLS as CAMERA_PROTOCOLS
from fourdgen.evaluation.cameras import load_gt_cameras
from fourdgen.evaluation.command import main as eval_main
from fourdgen.evaluation.depth import DepthProtocol, evaluate_depth
from fourdgen.evaluation.readers import (
    associate,
    read_depth_png,
    read_sintel_cam,
    read_sintel_depth,
    read_tum_trajectory,
)
from fourdgen.evaluation.views import evaluate_dycheck, evaluate_n3dv
from fourdgen.metrics.camera import camera_metrics
from tests import dataset_layouts as L


def _run_script(name, args, capsys):
    argv = sys.argv
    sys.argv = [name, *args]
    try:
        runpy.run_path(f"benchmarks/{name}", run_name="__main__")
    finally:
        sys.argv = argv
    return capsys.readouterr().out


def test_sintel_and_tum_readers(tmp_path):
    d = np.arange(12, dtype=np.float32).reshape(3, 4) + 0.5
    L.write_dpt(tmp_path / "a.dpt", d)
    np.testing.assert_array_equal(read_sintel_depth(tmp_path / "a.dpt"), d)
    (tmp_path / "bad.dpt").write_bytes(b"\0" * 20)
    with pytest.raises(SceneFormatError, match=r"bad\.dpt: field '<tag>'"):
        read_sintel_depth(tmp_path / "bad.dpt")
    K, w2c = L.known_cameras(1, 16, 12)
    L.write_cam(tmp_path / "a.cam", K[0], w2c[0])
    K2, w2c2 = read_sintel_cam(tmp_path / "a.cam")
    np.testing.assert_array_equal(K2, K[0])
    np.testing.assert_array_equal(w2c2, w2c[0])
    # 90 degrees about z at (1, 2, 3): c2w maps camera x to world y.
    (tmp_path / "gt.txt").write_text("# c\n5.0 1 2 3 0 0 0.7071067811865476 0.7071067811865476\n")
    t, w2c3 = read_tum_trajectory(tmp_path / "gt.txt")
    c2w = np.linalg.inv(w2c3[0])
    assert t.tolist() == [5.0]
    np.testing.assert_allclose(c2w[:3, 3], [1, 2, 3], atol=1e-12)
    np.testing.assert_allclose(c2w[:3, 0], [0, 1, 0], atol=1e-12)
    (tmp_path / "bad.txt").write_text("5.0 1 2 3 0 0\n")
    with pytest.raises(SceneFormatError, match=r"bad\.txt: field 'line 1'"):
        read_tum_trajectory(tmp_path / "bad.txt")
    iio.imwrite(tmp_path / "d.png", np.array([[5000, 0], [12500, 65535]], dtype=np.uint16))
    np.testing.assert_allclose(read_depth_png(tmp_path / "d.png"), [[1.0, 0.0], [2.5, 13.107]])
    assert associate(np.array([0.0, 0.1, 0.2]), np.array([0.19, 0.005, 0.5, 0.099])) == [
        (0, 1),
        (1, 3),
        (2, 0),
    ]


def _sintel_depth(root, seqs=("alley_1", "market_2"), T=3, H=12, W=16):
    g = np.random.default_rng(0)
    gts = {}
    for s in seqs:
        gt = g.uniform(1, 90, (T, H, W)).astype(np.float32)  # some over the cap of 70
        for t in range(T):
            L.write_dpt(root / "training" / "depth" / s / f"frame_{t + 1:04d}.dpt", gt[t])
        gts[s] = gt
    return gts


def _np_video_depth(pred, gt, cap=70.0):
    """MonST3R's pooled median-scale protocol, written out in numpy. Its median is torch.median's:
    the lower middle value of an even count (numpy's averages the two)."""
    v = (gt > 0) & (gt < cap) & (pred > 0)
    p, g = pred[v], gt[v]

    def lower_median(x):
        return np.sort(x)[(x.size - 1) // 2]

    p = np.minimum(p * lower_median(g) / lower_median(p), cap)
    return np.mean(np.abs(p - g) / g), np.mean(np.maximum(p / g, g / p) < 1.25), v.sum()


def test_sintel_depth_protocol_and_script(tmp_path, capsys):
    gts = _sintel_depth(tmp_path / "sintel")
    pred = tmp_path / "pred"
    pred.mkdir()
    noise = np.random.default_rng(1).uniform(0.7, 1.4, gts["alley_1"].shape)
    np.savez(pred / "alley_1.npz", depth=gts["alley_1"] * 0.25 * noise)  # one array per sequence
    (pred / "market_2").mkdir()
    for t, d in enumerate(gts["market_2"] * 3.0):  # per-frame files, exact up to scale
        np.save(pred / "market_2" / f"{t:04d}.npy", d)
    out = evaluate_depth("sintel", tmp_path / "sintel", pred)
    a_rel, a_d1, a_n = _np_video_depth(gts["alley_1"] * 0.25 * noise, gts["alley_1"])
    assert out["alley_1"]["abs_rel"] == pytest.approx(a_rel) and out["alley_1"]["delta1"] == pytest.approx(
        a_d1
    )
    assert out["market_2"]["abs_rel"] == pytest.approx(0, abs=1e-6) and out["market_2"]["delta1"] == 1.0
    n_b = out["market_2"]["valid_pixels"]
    assert out["mean"]["abs_rel"] == pytest.approx(a_rel * a_n / (a_n + n_b))
    text = _run_script(
        "eval_depth.py", ["sintel", "--gt", str(tmp_path / "sintel"), "--pred", str(pred)], capsys
    )
    assert "| sequence | Abs Rel | δ<1.25 (%) |" in text and "| market_2 | 0.0000 | 100.0 |" in text
    (pred / "alley_1.npz").unlink()
    with pytest.raises(SceneFormatError, match="alley_1.npz, alley_1.npy or a folder"):
        evaluate_depth("sintel", tmp_path / "sintel", pred)


def test_bonn_depth_frames_30_to_140(tmp_path, capsys):
    g = np.random.default_rng(2)
    gt = g.uniform(0.5, 8, (33, 6, 8))
    gt[:, 0, 0] = 0  # no measurement
    L.write_depth_pngs(tmp_path / "bonn" / "rgbd_bonn_balloon", gt)
    gt_q = np.round(gt * 5000) / 5000  # what the 16-bit PNG holds
    pred = tmp_path / "pred"
    pred.mkdir()
    np.save(pred / "rgbd_bonn_balloon.npy", 2 * gt_q[30:] + 1)  # the protocol's 3 frames
    res = eval_main(
        [
            "depth",
            "bonn",
            "--gt",
            str(tmp_path / "bonn"),
            "--pred",
            str(pred),
            "--align",
            "scale_shift",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert res["mean"]["abs_rel"] == pytest.approx(0, abs=1e-6) and res["mean"]["valid_pixels"] == 3 * 47
    assert json.loads((tmp_path / "r.json").read_text())["rgbd_bonn_balloon"]["delta1"] == 1.0
    wrong = evaluate_depth(
        "bonn", tmp_path / "bonn", pred, "scale_shift", protocol=DepthProtocol(start=29, count=3)
    )
    assert wrong["mean"]["abs_rel"] > 0.05  # off by one frame: the protocol's range matters
    capsys.readouterr()


def _similar(w2c, s=2.0):
    """The same cameras in a world moved by ``x -> s R x + t``: centres move like points, each
    camera turns with R (it sees the moved world as before, at s times the depth)."""
    R, t = L.look_at_w2c((1.0, 2.0, 0.5))[:3, :3], np.array([0.3, -1.0, 2.0])
    out = np.tile(np.eye(4), (len(w2c), 1, 1))
    for i, m in enumerate(w2c):
        c = -m[:3, :3].T @ m[:3, 3]
        Rc = m[:3, :3] @ R.T
        out[i, :3, :3], out[i, :3, 3] = Rc, -Rc @ (s * R @ c + t)
    return out


def test_sintel_cameras_protocol(tmp_path, capsys):
    K, w2c = L.known_cameras(5, 16, 12)
    for t in range(5):
        L.write_cam(
            tmp_path / "sintel" / "training" / "camdata_left" / "alley_1" / f"frame_{t + 1:04d}.cam",
            K[t],
            w2c[t],
        )
    pred = tmp_path / "pred"
    pred.mkdir()
    np.save(pred / "alley_1.npy", _similar(w2c))
    text = _run_script(
        "eval_cameras.py", ["sintel", "--gt", str(tmp_path / "sintel"), "--pred", str(pred)], capsys
    )
    assert "| sequence | ATE | RPE-T | RPE-R (deg) |" in text
    assert "| alley_1 | 0.0000 | 0.0000 | 0.0000 |" in text and "| mean | 0.0000 |" in text


def test_tum_cameras_first_90_frames_stride_3(tmp_path):
    g = np.random.default_rng(3)
    n = 100
    eyes = np.stack([np.linspace(-1, 1, 2 * n), np.sin(np.linspace(0, 3, 2 * n)), np.full(2 * n, -3.0)], 1)
    w2c_gt = np.stack([L.look_at_w2c(e, target=(0.0, 0.0, 1.0)) for e in eyes])
    t_gt = 1000 + np.arange(2 * n) * 0.0165  # ground truth at twice the frame rate
    t_rgb = 1000 + np.arange(n) * 0.033 + 0.002
    L.write_tum(tmp_path / "tum" / "freiburg3_walking_xyz", w2c_gt, t_rgb, t_gt)
    want = w2c_gt[0 : 2 * 90 : 2][::3]  # frame i's nearest pose is 2i; 30 frames
    np.testing.assert_allclose(
        load_gt_cameras(
            "tum",
            tmp_path / "tum",
            "freiburg3_walking_xyz",
            CAMERA_PROTOCOLS["tum"],
        ),
        want,
        atol=1e-8,
    )
    noisy = want.copy()
    noisy[:, :3, 3] += g.normal(scale=0.05, size=(30, 3))
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "freiburg3_walking_xyz.txt").write_text(
        "\n".join(L.tum_line(t, m) for t, m in enumerate(noisy)) + "\n"
    )
    res = eval_main(["cameras", "tum", "--gt", str(tmp_path / "tum"), "--pred", str(pred)])
    ref = camera_metrics(torch.as_tensor(noisy), torch.as_tensor(want))
    for k in ("ate", "rpe_t", "rpe_r"):
        assert res["freiburg3_walking_xyz"][k] == pytest.approx(ref[k], rel=1e-6)
    assert res["mean"]["ate"] > 0.01


def test_n3dv_held_out_view(tmp_path, capsys):
    g = np.random.default_rng(4)
    rgb = g.integers(0, 256, (2, 3, 32, 40, 3), dtype=np.uint8)  # AlexNet LPIPS needs >= 32 px
    K = torch.tensor([[20.0, 0, 20], [0, 20, 16], [0, 0, 1]]).expand(2, 3, 3)
    write_scene(tmp_path / "scene", rgb, K, torch.eye(4).expand(2, 4, 4))
    noisy = np.clip(rgb[0].astype(int) + g.integers(-20, 21, rgb[0].shape), 0, 255).astype(np.uint8)
    (tmp_path / "pred").mkdir()
    for t, f in enumerate(noisy):
        iio.imwrite(tmp_path / "pred" / f"{t:04d}.png", f)
    out = evaluate_n3dv(tmp_path / "scene", tmp_path / "pred", allow_random_lpips=True)
    mse = ((noisy / 255.0 - rgb[0] / 255.0) ** 2).reshape(3, -1).mean(1)
    assert out["psnr"] == pytest.approx(np.mean(-10 * np.log10(mse)), abs=1e-3)
    assert 0 < out["ssim"] < 1 and out["lpips"] > 0
    text = _run_script(
        "eval_views.py", ["n3dv", "--gt", str(tmp_path / "scene"), "--pred", str(tmp_path / "pred")], capsys
    )
    assert "| cam00 |" in text and "| sequence | PSNR | SSIM | LPIPS |" in text


def test_dycheck_masked_metrics_on_covisible_pixels(tmp_path, capsys):
    H, W = 32, 48
    K, w2c = L.known_cameras(3, W, H)
    imgs = L.frames(3, H, W, seed=5)
    train = [(f"0_{t:05d}", 0, t, K[0], w2c[0], imgs[0]) for t in range(2)]
    val = [(f"1_{t:05d}", 1, t, K[1], w2c[1], imgs[t + 1]) for t in range(2)]
    L.write_dycheck(tmp_path / "apple", train, val, W, H)  # covisible: the left half
    (tmp_path / "pred").mkdir()
    g = np.random.default_rng(6)
    mp = []
    for name, _, t, *_ in val:
        gt = imgs[t + 1].astype(float)
        out = np.clip(gt + g.integers(-10, 11, gt.shape), 0, 255)
        out[:, W // 2 :] = 255 - gt[:, W // 2 :]  # wrong where not covisible: must not count
        iio.imwrite(tmp_path / "pred" / f"{name}.png", out.astype(np.uint8))
        mp.append(-10 * np.log10((((out - gt) / 255.0) ** 2)[:, : W // 2].mean()))
    res = evaluate_dycheck(tmp_path / "apple", tmp_path / "pred", allow_random_lpips=True)
    assert res["frames"] == 2 and res["mpsnr"] == pytest.approx(np.mean(mp)) and res["mpsnr"] > 25
    assert 0 < res["mssim"] <= 1 and res["mlpips"] >= 0
    text = _run_script(
        "eval_views.py",
        ["dycheck", "--gt", str(tmp_path / "apple"), "--pred", str(tmp_path / "pred")],
        capsys,
    )
    assert "| apple |" in text and "mPSNR" in text


def test_video_metrics_command(tmp_path, capsys):
    from tests.test_eval_metrics import _TinyI3D

    torch.manual_seed(0)
    torch.jit.script(_TinyI3D()).save(str(tmp_path / "i3d.pt"))
    g = np.random.default_rng(7)
    for folder, shift in (("real", 0), ("fake", 60)):
        for v in range(3):
            d = tmp_path / folder / f"clip{v}"
            d.mkdir(parents=True)
            for t in range(4):
                iio.imwrite(
                    d / f"{t:03d}.png",
                    np.clip(g.integers(0, 196, (8, 8, 3)) + shift, 0, 255).astype(np.uint8),
                )
    i3d = str(tmp_path / "i3d.pt")
    args = ["--fake", str(tmp_path / "fake"), "--real", str(tmp_path / "real"), "--i3d", i3d]
    assert "| sequence | FVD | CLIP-F | CLIP-V |" in _run_script("eval_video.py", args, capsys)
    res = eval_main(["video", *args])["fake"]
    same = eval_main(
        [
            "video",
            "--fake",
            str(tmp_path / "real"),
            "--real",
            str(tmp_path / "real"),
            "--i3d",
            str(tmp_path / "i3d.pt"),
        ]
    )
    assert (
        res["videos"] == 3
        and res["fvd"] > same["real"]["fvd"]
        and same["real"]["fvd"] == pytest.approx(0, abs=1e-6)
    )
    assert "| sequence | FVD | CLIP-F | CLIP-V |" in capsys.readouterr().out
