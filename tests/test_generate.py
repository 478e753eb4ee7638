"""``fourdgen generate``: each tiny pipeline end to end on CPU (random tiny weights saved first, as a
user would point the pipeline at them), outputs read back with fourdgen's readers and plyfile, a run
killed between steps and resumed without rerunning finished steps, and one-line errors for bad
inputs before anything is written."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v2 as iio
import numpy as np
import pytest
import torch
from plyfile import PlyData

from fourdgen.backbones.depth import save_tiny_depth_anything
from fourdgen.data.scene import read_scene
from fourdgen.data.scene_writer import write_video
from fourdgen.gaussians.ply import load_ply_sequence
from fourdgen.generate.command import main as generate
from fourdgen.generate.media import plan_times
from fourdgen.geometry.cameras import camera_centers
from fourdgen.geometry.orbit import orbit_cameras
from fourdgen.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "lightning_configs" / "tiny"
PIPES = ROOT / "lightning_configs" / "pipelines" / "tiny"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are all thread start-up on a shared two-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random tiny weights of every model the tiny pipelines name (tools/random_checkpoint.py,
    fourdgen.backbones.depth.save_tiny_depth_anything), as ``--weights`` arguments per pipeline."""
    root = tmp_path_factory.mktemp("weights")
    save = _tool("random_checkpoint").save_random_checkpoint
    ck = {}
    for name, extra in (
        ("video", []),
        ("one4d", []),
        ("full4d", []),
        ("4real_v2", []),
        ("recon_dynamic", ["--model.init_args.init_checkpoint=null"]),
    ):
        ck[name] = str(save([f"--config={TINY / name}.yaml", *extra], root / f"{name}.ckpt"))
    depth = str(save_tiny_depth_anything(root / "depth"))
    return {
        "image_to_4d": [f"video={ck['video']}"],
        "video_to_4d": [f"video={ck['one4d']}"],
        "video_to_4d_gaussians": [f"grid={ck['full4d']}", f"depth={depth}"],
        "grid_to_gaussians": [f"grid={ck['4real_v2']}", f"recon={ck['recon_dynamic']}"],
    }


def _args(pipeline: str, inputs: list[Path], out: Path, weights: dict, *extra: str) -> list[str]:
    w = [a for item in weights[pipeline] for a in ("--weights", item)]
    return [
        "--pipeline",
        str(PIPES / f"{pipeline}.yaml"),
        "--input",
        *map(str, inputs),
        "--out",
        str(out),
        *w,
        *extra,
    ]


def _video(path: Path, frames: int, fps: float, h: int = 40, w: int = 48, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    v = np.zeros((frames, h, w, 3), np.uint8)
    for t in range(frames):  # a square moving right over a coloured background
        v[t] = rng.integers(0, 60, 3)
        v[t, 10:26, 2 * t % w : 2 * t % w + 12] = [220, 60, 40]
    write_video(path, v, fps)
    return path


def _points(ply: Path) -> int:
    v = PlyData.read(str(ply))["vertex"]
    assert {"x", "y", "z"} <= set(v.data.dtype.names)
    return len(v)


def _frames(mp4: Path) -> int:
    with iio.get_reader(mp4, format="FFMPEG") as r:
        return r.count_frames()


def test_image_to_4d_then_resume_and_rerun_on_change(tmp_path, weights):
    img = tmp_path / "cat.png"
    iio.imwrite(img, (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))
    out = tmp_path / "run"
    state = generate(_args("image_to_4d", [img], out, weights, "--prompt", "a cat"))
    assert [state["steps"][s]["status"] for s in ("import", "video")] == ["done", "done"]
    scene = read_scene(out / "import" / "cat")
    assert (scene.num_frames, scene.height, scene.width, scene.caption) == (5, 32, 32, "a cat")
    clip = out / "video" / "cat"
    assert [_points(clip / "points" / f"frame_{t:04d}.ply") for t in range(5)] == [32 * 32] * 5
    cams = json.loads((clip / "cameras.json").read_text())
    assert torch.tensor(cams["w2c"]).shape == (5, 4, 4) and torch.tensor(cams["K"]).shape == (3, 3)
    assert np.load(clip / "depth.npz")["depth"].shape == (5, 32, 32)
    assert _frames(clip / "novel_view.mp4") == 12 and _frames(clip / "rgb.mp4") == 5
    rec = json.loads((out / "generate.json").read_text())
    assert rec["inputs"][0]["sha256"]["cat.png"] and rec["steps"]["video"]["resolved_config"]["ckpt_path"]
    assert "still" in rec["steps"]["import"]["record"]["scene"][0]["time_mode"]

    # again without --resume: refused; with it: nothing reruns
    with pytest.raises(FileExistsError, match="--resume"):
        generate(_args("image_to_4d", [img], out, weights, "--prompt", "a cat"))
    mtime = (clip / "rgb.mp4").stat().st_mtime_ns
    state = generate(_args("image_to_4d", [img], out, weights, "--prompt", "a cat", "--resume"))
    assert state["steps"]["import"]["skipped"] == state["steps"]["video"]["skipped"] == 1
    assert (clip / "rgb.mp4").stat().st_mtime_ns == mtime
    # a changed input reruns the steps that depend on it
    state = generate(_args("image_to_4d", [img], out, weights, "--prompt", "a dog", "--resume"))
    assert "skipped" not in state["steps"]["import"] and "skipped" not in state["steps"]["video"]
    assert read_scene(out / "import" / "cat").caption == "a dog"


def test_video_to_4d_resamples_the_clip_to_the_model(tmp_path, weights):
    clip = _video(tmp_path / "clip.mp4", frames=24, fps=16)  # 1.5 s at 16 fps -> 5 frames at 8 fps
    out = tmp_path / "run"
    state = generate(_args("video_to_4d", [clip], out, weights))
    rec = state["steps"]["import"]["record"]["scene"][0]
    assert rec["source_indices"] == [0, 2, 4, 6, 8] and rec["fps"] == 8 and rec["source_fps"] == 16
    assert rec["source_size"] == [48, 40] and rec["resized_to"] == [38, 32] and rec["crop_left_top"] == [3, 0]
    scene = read_scene(out / "import" / "clip")
    assert scene.num_frames == 5 and scene.fps == 8
    got = out / "video" / "clip"
    assert _points(got / "points" / "frame_0004.ply") == 32 * 32 and _frames(got / "novel_view.mp4") == 12


def test_video_to_4d_gaussians_killed_between_steps_resumes_without_rerunning(tmp_path, weights):
    """A run killed (SIGKILL) while the grid step is in flight keeps the three finished steps; the
    resumed run skips them, runs grid and fit, and the scene reads back."""
    clip = _video(tmp_path / "clip.mp4", frames=10, fps=8)
    out = tmp_path / "run"
    argv = _args("video_to_4d_gaussians", [clip], out, weights, "--num_threads", "1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fourdgen.main", "generate", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    state_file, deadline = out / "generate.json", time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                steps = json.loads(state_file.read_text())["steps"]
            except (OSError, ValueError, KeyError):
                steps = {}
            if steps.get("grid", {}).get("status") == "running":
                break
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    steps = json.loads(state_file.read_text())["steps"]
    assert [steps[s]["status"] for s in ("import", "depth", "cameras")] == ["done"] * 3, steps
    assert steps["grid"]["status"] == "running" and not (out / "grid").exists()
    before = {s: (out / s).stat().st_mtime_ns for s in ("import", "depth", "cameras")}

    state = generate(argv[:-2] + ["--resume"])
    for s in ("import", "depth", "cameras"):
        assert state["steps"][s]["skipped"] == 1 and (out / s).stat().st_mtime_ns == before[s]
    assert state["steps"]["grid"]["status"] == state["steps"]["fit"]["status"] == "done"
    assert not list(out.glob(".*.partial"))
    cams = read_scene(out / "cameras" / "clip")
    assert cams.num_views == 3 and cams.source_view == 0 and cams.has_depth
    centers = camera_centers(cams.w2c[:, 0])
    assert (
        torch.allclose(centers[0], torch.zeros(3), atol=1e-5)
        and (centers[1:] - centers[0]).norm(dim=-1).min() > 0
    )
    grid = read_scene(out / "grid" / "clip" / "scene")
    assert grid.num_views == 3 and grid.source_view == 0 and grid.views[0].depth is not None
    assert _frames(out / "grid" / "clip" / "mosaic.mp4") == 5
    plys = sorted((out / "fit" / "scene" / "ply").glob("frame_*.ply"))
    assert len(plys) == 5 and all(_points(p) > 0 for p in plys)
    assert len(load_ply_sequence(out / "fit" / "scene" / "ply")) == 5
    assert _frames(out / "fit" / "scene" / "flythrough.mp4") == 12


def test_grid_to_gaussians_from_a_fixed_view_and_a_freeze_time_video(tmp_path, weights):
    fixed = _video(tmp_path / "fixed.mp4", frames=10, fps=8)
    sweep = _video(tmp_path / "sweep.mp4", frames=7, fps=8, seed=1)
    out = tmp_path / "run"
    state = generate(_args("grid_to_gaussians", [fixed, sweep], out, weights))
    scene = read_scene(out / "import" / "fixed")
    assert (scene.num_views, scene.num_frames) == (3, 5)
    rgb = torch.stack([scene.load_rgb(v) for v in range(3)])  # [V, T, 3, H, W]
    assert rgb[0].amax() > 0 and rgb[1:, 0].amax() > 0 and rgb[1:, 1:].amax() == 0  # row + column given
    assert state["steps"]["import"]["record"]["scene"][1]["source_indices"] == [0, 3, 6]
    grid = read_scene(out / "grid" / "fixed" / "scene")
    assert grid.num_views == 3 and grid.extra["cameras"] == "unknown"
    recon = out / "recon" / "scene"
    assert (
        len(load_ply_sequence(recon / "gaussians")) == 5
        and _points(recon / "gaussians" / "frame_0000.ply") > 0
    )
    assert _frames(recon / "render_path.mp4") == 8


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_input", "no such file or folder"),
        ("image_for_video", "this is an image"),
        ("corrupt_video", "cannot open as a video"),
        ("missing_weights", "ckpt_path /nonexistent.ckpt is not a file"),
        ("frame_count", "num_frames = 6, but the VAE takes 2k+1 frames"),
        ("azimuths", "cameras.azimuths: 2 views, but step 'grid' generates data.init_args.num_views = 3"),
        ("bad_set", "has no step 'nope'"),
        ("bad_key", "step 2 'video' (predict video.yaml)"),
        ("two_inputs", "takes one input"),
    ],
)
def test_bad_inputs_fail_before_any_work_with_one_line(tmp_path, weights, capsys, case, message):
    img = tmp_path / "a.png"
    iio.imwrite(img, np.zeros((8, 8, 3), np.uint8))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    clip = _video(tmp_path / "clip.mp4", frames=10, fps=8)
    out = tmp_path / "out"
    pipe, inputs, extra = {
        "missing_input": ("video_to_4d", [tmp_path / "nope.mp4"], []),
        "image_for_video": ("video_to_4d", [img], []),
        "corrupt_video": ("video_to_4d", [bad], []),
        "missing_weights": ("image_to_4d", [img], ["--weights", "video=/nonexistent.ckpt"]),
        "frame_count": ("video_to_4d", [clip], ["--set", "video.data.init_args.num_frames=6"]),
        "azimuths": ("video_to_4d_gaussians", [clip], ["--set", "cameras.azimuths=[0, 90]"]),
        "bad_set": ("video_to_4d", [clip], ["--set", "nope.x=1"]),
        "bad_key": ("image_to_4d", [img], ["--set", "video.model.init_args.no_such_option=1"]),
        "two_inputs": ("video_to_4d", [clip, clip], []),
    }[case]
    with pytest.raises(SystemExit) as e:
        main(["generate", *_args(pipe, inputs, out, weights, *extra)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("fourdgen: error: ") and message in err[0], err
    assert not out.exists()  # nothing was written


def test_time_resampling_choices():
    idx, rec = plan_times(num_src=100, src_fps=30, T=5, fps=10)
    assert idx == [0, 3, 6, 9, 12] and rec["time_mode"] == "model fps"
    idx, rec = plan_times(num_src=4, src_fps=8, T=5, fps=8)  # too short: stretched over the clip
    assert idx == [0, 1, 2, 2, 3] and rec["time_mode"].startswith("stretched")
    with pytest.raises(ValueError, match="shorter than the 5 frames"):
        plan_times(num_src=4, src_fps=8, T=5, fps=8, short="error")


def test_orbit_cameras_circle_the_subject():
    center = torch.tensor([0.0, 0.0, 2.0])
    w2c = orbit_cameras(torch.eye(4), center, [0, 90, 180], elevation_deg=0.0)
    torch.testing.assert_close(w2c[0], torch.eye(4), atol=1e-6, rtol=0)  # azimuth 0 is the source
    c = camera_centers(w2c)
    torch.testing.assert_close((c - center).norm(dim=-1), torch.full((3,), 2.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(c[1], torch.tensor([2.0, 0.0, 2.0]), atol=1e-5, rtol=0)  # to the right
    for cam in w2c:  # every camera looks at the centre: it projects to the optical axis
        p = cam[:3, :3] @ center + cam[:3, 3]
        assert p[:2].abs().max() < 1e-5 and p[2] > 0
    up = camera_centers(orbit_cameras(torch.eye(4), center, [0], elevation_deg=30.0))[0]
    assert up[1] < 0  # raised: OpenCV's up is -y


@pytest.mark.parametrize(
    "pipeline", sorted((ROOT / "lightning_configs" / "pipelines").rglob("*.yaml")), ids=str
)
def test_every_pipeline_file_parses_and_its_recipes_exist(pipeline):
    from fourdgen.generate.spec import load_pipeline

    pipe = load_pipeline(pipeline)
    assert pipe.steps and pipe.steps[0].run == "import"
    for step in pipe.steps:
        assert not step.is_lightning or Path(step.config).is_file(), step.config


def test_weight_paths_skip_lpips_weights_a_stage_never_reads():
    """A prediction step sets ``lpips_net: null``; the recipe's LPIPS weights path is then unused
    and must not fail the pre-flight check (it did on the device: checkpoints/lpips/alexnet.pth)."""
    from fourdgen.generate.stages import weight_paths

    cfg = {
        "model": {"init_args": {"lpips_net": None, "lpips_weights": "no/alex.pth", "checkpoint": "a.ckpt"}},
        "fit": {"lpips_net": "alex", "lpips_weights": "w/alex.pth"},
        "recon": {"lpips_weight": 0, "lpips_loss_net": "vgg", "lpips_loss_weights": "w/vgg.pth"},
        "recon2": {"lpips_weight": 0.5, "lpips_loss_net": "vgg", "lpips_loss_weights": "w/vgg.pth"},
    }
    assert weight_paths(cfg) == [
        ("model.init_args.checkpoint", "a.ckpt"),
        ("fit.lpips_weights", "w/alex.pth"),
        ("recon2.lpips_loss_weights", "w/vgg.pth"),
    ]
