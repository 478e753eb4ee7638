"""``fourdgen view``: each input kind loads, bad paths get one clear error, the server starts on a
free port and stops, the fly-through button writes an mp4, the live viewer costs nothing while
nobody looks, and headless Chromium sees the scene move when the time slider moves and flies its
camera to an input camera when a mouse click lands on that camera's frustum."""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.request
from types import SimpleNamespace

import imageio.v2 as iio
import lightning as L
import numpy as np
import pytest
import torch
import viser.transforms as tf

from fourdgen.callbacks.export import Export4DGS
from fourdgen.callbacks.pointmaps import PointmapVideoWriter
from fourdgen.callbacks.recon import ReconExport
from fourdgen.callbacks.viewer import LiveViewer
from fourdgen.data.protocols import CAMERAS_KEY
from fourdgen.data.scene import read_scene
from fourdgen.gaussians.container import Gaussians
from fourdgen.gaussians.ply import load_ply
from fourdgen.geometry.rotations import quaternion_to_matrix
from fourdgen.main import main as fourdgen_main
from fourdgen.models.gaussian_recon import ReconPrediction
from fourdgen.view import load_source
from fourdgen.viewer import ViewerApp, ViewerInputError
from fourdgen.viewer.browser import HeadlessChromium, find_chromium
from fourdgen.viewer.splats import top_opacity, viser_splats
from tests.test_fit import _dm, _fitter, _trainer

STEPS = 8


# ------------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny stage-3 fit: ``(model, last.ckpt, export folder)`` (the fitter's PLY per frame)."""
    tmp = tmp_path_factory.mktemp("fit")
    dm = _dm(tmp)
    model = _fitter(STEPS)
    export = Export4DGS(out_dir=str(tmp / "export"), path_samples=3)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True)
    _trainer(tmp, STEPS, callbacks=[export, ckpt], enable_checkpointing=True).fit(model, dm)
    return model, tmp / "ckpt" / "last.ckpt", tmp / "export"


@pytest.fixture(scope="module")
def moving_gaussians(tmp_path_factory, tiny_synthetic):
    """The reconstructor's export (``ReconExport.write_clip``) of Gaussians on the synthetic scene's
    pixels: every pixel of every view, so the moving objects move from frame to frame."""
    s = tiny_synthetic
    V, T, H, W = s.depth.shape
    means = s.xyz.permute(1, 0, 2, 3, 4).reshape(T, V * H * W, 3)
    rgb = s.rgb.permute(1, 0, 2, 3, 4).reshape(T, V * H * W, 3)
    frames = [Gaussians.from_points(means[t], rgb[t], init_opacity=0.95, scale_mult=0.7) for t in range(T)]
    gauss = {k: torch.stack([getattr(g, k) for g in frames])[None] for k in Gaussians.__dataclass_fields__}
    pred = ReconPrediction(
        K=s.K[None, :, None].expand(1, V, T, 3, 3),
        w2c=s.w2c[None],
        depth=s.depth[None],
        depth_conf=torch.ones_like(s.depth[None]),
        gaussians=gauss,
    )
    out = tmp_path_factory.mktemp("recon") / "clip"
    ReconExport(out_dir=str(out.parent), path_samples=3).write_clip(out, pred, 0, (H, W))
    return out, frames


@pytest.fixture(scope="module")
def pointmaps(tmp_path_factory, tiny_synthetic):
    """The pointmap writer's clip folder (``points/frame_XXXX.ply``, ``cameras.json``) of view 0."""
    s = tiny_synthetic
    clip = {
        "scene_id": "clip",
        "rgb": s.rgb[0].permute(0, 3, 1, 2) * 2 - 1,
        "xyz": s.xyz[0],
        "K": s.K[0],
        "w2c": s.w2c[0],
        "depth": s.depth[0],
    }
    out = tmp_path_factory.mktemp("pointmaps")
    PointmapVideoWriter(out_dir=str(out)).write_clip(clip)
    return out / "clip"


def test_checkpoint_evaluates_the_field_at_any_time(fitted, tmp_path):
    model, ckpt, export = fitted
    src = load_source(ckpt)
    assert (src.kind, src.continuous, src.num_frames) == ("checkpoint", True, 6)
    torch.testing.assert_close(src.cameras.K, model.info.K)
    assert src.cameras.path_views == model.info.train_views == [0, 1, 3]
    # the field at frame 3's time is what the fitter exported for frame 3
    torch.testing.assert_close(
        src.frame(model.info.times[3]).gaussians.means, load_ply(export / "ply/frame_0003.ply").means
    )
    between = src.frame(0.5).gaussians  # between two frames: the field, not the nearest PLY
    assert len(between) == len(model.splats["means"]) and torch.isfinite(between.means).all()
    # a checkpoint without its cameras falls back to its DataModule's scene folder, same cameras
    old = torch.load(ckpt, weights_only=True)
    del old[CAMERAS_KEY]
    torch.save(old, tmp_path / "old.ckpt")
    again = load_source(tmp_path / "old.ckpt")
    torch.testing.assert_close(again.cameras.w2c, src.cameras.w2c)
    assert again.cameras.path_views == src.cameras.path_views


def test_fitter_export_folder(fitted):
    model, _, export = fitted
    src = load_source(export)  # finds ply/ and the export's cameras.json
    assert (src.kind, src.num_frames, src.path.name) == ("gaussian-ply", 6, "ply")
    torch.testing.assert_close(src.cameras.w2c, model.info.w2c)
    assert (src.cameras.width, src.cameras.height) == (model.info.width, model.info.height)
    torch.testing.assert_close(src.frame(1.0).gaussians.means, load_ply(export / "ply/frame_0005.ply").means)


def test_reconstructor_and_pointmap_folders(moving_gaussians, pointmaps, tiny_synthetic):
    out, frames = moving_gaussians
    src = load_source(out)
    assert (src.kind, src.num_frames, src.cameras.num_views) == ("gaussian-ply", 6, 4)
    torch.testing.assert_close(src.frame(0.4).gaussians.means, frames[2].means)
    pts = load_source(pointmaps / "points", fps=12)  # the PLY folder itself; cameras one folder up
    assert (pts.kind, pts.num_frames, pts.fps) == ("point-ply", 6, 12.0)
    f = pts.frame(1.0)
    torch.testing.assert_close(f.points, tiny_synthetic.xyz[0, 5].reshape(-1, 3))
    torch.testing.assert_close(f.colors, tiny_synthetic.rgb[0, 5].reshape(-1, 3), atol=1 / 255, rtol=0)
    # one camera that moves: a pose per frame, image size from its principal point
    assert pts.cameras.w2c.shape == (1, 6, 4, 4) and (pts.cameras.width, pts.cameras.height) == (40, 32)


def test_scene_folder(tiny_scene_dir):
    src = load_source(tiny_scene_dir, max_points=1000)
    scene = read_scene(tiny_scene_dir)
    assert (src.kind, src.num_frames, src.fps) == ("scene", scene.num_frames, scene.fps)
    f0, f5 = src.frame(0.0), src.frame(1.0)
    assert len(f0) == 1000 and not torch.equal(f0.points, f5.points)  # a subset of 4 x 32 x 40 points
    images = src.view_images(2)
    assert len(images) == 4 and images[0].shape == (32, 40, 3) and images[0].dtype == np.uint8


def test_bad_paths_give_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"state_dict": {"transformer.w": torch.zeros(1)}}, tmp_path / "video.ckpt")
    for bad, says in (
        (tmp_path / "missing", "no such file or folder"),
        (tmp_path / "empty", "a folder without scene.json or frame_XXXX.ply files"),
        (tmp_path / "notes.txt", "not a readable PyTorch checkpoint"),
        (tmp_path / "video.ckpt", "not of the stage-3 fitter"),
    ):
        with pytest.raises(ViewerInputError, match=says) as e:
            load_source(bad)
        assert str(bad) in str(e.value) and "expected a stage-3 checkpoint" in str(e.value)
    with pytest.raises(SystemExit) as e:
        fourdgen_main(["view", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert err.startswith(f"fourdgen: error: {tmp_path / 'missing'}: no such file or folder")


def test_max_gaussians_keeps_the_most_opaque_and_splats_have_the_covariance(moving_gaussians):
    g = moving_gaussians[1][0]
    g.opacity_logits = torch.linspace(-3, 3, len(g)).flip(0)
    kept = top_opacity(g, 100)
    torch.testing.assert_close(kept.means, g.means[:100])
    assert top_opacity(g, None) is g
    s = viser_splats(kept)
    cov = torch.from_numpy(s["covariances"])
    torch.testing.assert_close(
        torch.linalg.eigvalsh(cov), (kept.scales**2).sort(-1).values, rtol=1e-4, atol=1e-9
    )
    assert s["opacities"].shape == (100, 1) and s["rgbs"].max() <= 1


def _closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class _FakeClient:
    """Stands in for viser's ClientHandle: records what the viewer sets on its camera."""

    def __init__(self):
        self.client_id = -1
        self.moved = []  # the viewer's camera-update callbacks
        self.camera = SimpleNamespace(fov=None, wxyz=None, position=None, on_update=self.moved.append)

    def atomic(self):
        return contextlib.nullcontext()


def test_server_starts_on_a_free_port_renders_the_flythrough_and_stops(fitted, pointmaps, tmp_path):
    _, ckpt, _ = fitted
    app = ViewerApp(load_source(ckpt), port=0, out_dir=tmp_path / "gauss", path_samples=5, verbose=False)
    try:
        port = app.server.get_port()
        assert app.url == f"http://127.0.0.1:{port}" and app.server.get_host() == "127.0.0.1"
        page = urllib.request.urlopen(app.url, timeout=10).read().decode()
        assert "<html" in page.lower()
        app.set_frame(2.5, wait=20)  # between frames 2 and 3: a fitted scene takes any time
        assert app.frame == 2.5 and app._splats is not None
        client = _FakeClient()
        app._fly_to(client, 1)  # what clicking frustum 1 does to the clicking browser's camera
        c2w = torch.linalg.inv(app.source.cameras.at(0)[1].double())
        torch.testing.assert_close(torch.from_numpy(client.camera.position), c2w[:3, 3])
        R = quaternion_to_matrix(torch.from_numpy(client.camera.wxyz))
        torch.testing.assert_close(R, c2w[:3, :3])
        assert client.camera.fov == pytest.approx(app.source.cameras.fov_y(1))
        # standing in camera 1, its frustum would fill the view: hidden until the camera leaves it
        assert [h.visible for h in app._frusta] == [v != 1 for v in range(len(app._frusta))]
        (moved,) = client.moved
        moved(SimpleNamespace(position=c2w[:3, 3].numpy() + 10.0))  # sent before the fly-to arrived
        assert not app._frusta[1].visible
        moved(client.camera)  # arrived
        moved(SimpleNamespace(position=c2w[:3, 3].numpy() + 10.0))  # and left
        assert all(h.visible for h in app._frusta)
        video = app.render_flythrough()
        assert video == tmp_path / "gauss" / "flythrough.mp4"
        assert len(iio.mimread(video)) == 5
    finally:
        app.stop()
    assert _closed(port)
    with ViewerApp(load_source(pointmaps / "points"), port=0, verbose=False) as play:
        assert play._play_event.is_set() is False  # paused: the playback thread sleeps
        play._fps.value = 20.0
        play._toggle_play()
        seen, deadline = {play.frame}, time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            seen.add(play.frame)
            time.sleep(0.02)
        play._toggle_play()
        assert len(seen) >= 3 and play._play.label == "Play"  # it played through frames, then paused
        time.sleep(0.2)  # a tick already under way
        paused_at = play.frame
        time.sleep(0.3)
        assert play.frame == paused_at
    with ViewerApp(
        load_source(pointmaps), port=0, out_dir=tmp_path / "pts", path_samples=4, verbose=False
    ) as pts:
        assert pts.wait_shown(20) and pts._points is not None
        frames = iio.mimread(pts.render_flythrough())
        assert len(frames) == 4 and np.asarray(frames).std() > 10  # the points, not a blank image


# --------------------------------------------------------------------------------- live fit
def test_live_viewer_does_nothing_while_nobody_looks(tmp_path, monkeypatch):
    live = LiveViewer(port=0, every_n_steps=3)
    model, steps = _fitter(12), 12
    seen = []

    class Check(L.Callback):  # after the viewer's own batch-end hook
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 6:  # a browser connects
                monkeypatch.setattr(live.app.server, "get_clients", lambda: {0: object()})
            seen.append((trainer.global_step, live.syncs))

    _trainer(tmp_path, steps, callbacks=[live, Check()]).fit(model, _dm(tmp_path))
    idle = [s for step, s in seen if step <= 6]
    assert set(idle) == {1}  # the copy made at the start, then nothing while nobody is connected
    watched = dict(seen)
    assert watched[9] == 2 and watched[12] == 3  # then every 3 steps
    assert live.app is None  # stopped with the fit
    torch.testing.assert_close(live._copy.splats["means"], model.splats["means"])


# ------------------------------------------------------------------------------- browser
def _scene_pixels(image: np.ndarray) -> np.ndarray:
    """The 3D view: below viser's notification, left of its control panel, right of its axes icon."""
    H, W = image.shape[:2]
    return image[int(H * 0.35) :, int(W * 0.1) : int(W * 0.45)].astype(np.int16)


def _drawn(image: np.ndarray) -> float:
    """The fraction of the 3D view that is not the page's white background."""
    return float((np.abs(_scene_pixels(image) - 255).max(-1) > 40).mean())


def _steady(check):
    """``check(image)`` holding on two screenshots in a row that look the same (loaded, not fading)."""
    last = []

    def ok(image):
        good = check(image) and bool(last) and float(np.abs(image.astype(np.int16) - last[-1]).mean()) < 1
        last[:] = [image]
        return good

    return ok


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium on PATH (Debian: apt-get install chromium)")
def test_chromium_sees_the_scene_move_with_the_time_slider(moving_gaussians):
    out, _ = moving_gaussians
    with (
        ViewerApp(load_source(out), port=0, verbose=False) as app,
        HeadlessChromium(width=640, height=420) as browser,
    ):
        browser.goto(app.url)
        first = browser.wait_for_image(_steady(lambda im: _drawn(im) > 0.3), timeout=60)
        assert _drawn(first) > 0.3, f"the viewer's page shows no scene ({_drawn(first):.0%} drawn)"
        app.set_frame(5, wait=20)

        def moved(image):
            return float(np.abs(_scene_pixels(image) - _scene_pixels(first)).mean()) > 3

        later = browser.wait_for_image(_steady(lambda im: _drawn(im) > 0.3 and moved(im)), timeout=30)
        assert moved(later), "the scene did not change when the time slider moved"
        assert _drawn(later) > 0.3


def _image_centre(frustum) -> np.ndarray:
    """The world point at the centre of a frustum's image plane, where viser's client draws it
    (``CameraFrustumVariants.tsx``: the half-extents tan(fov/2) x aspect, 1 are divided by the cube
    root of their volume / 3, then scaled; the image sits at that depth on the frustum's +Z)."""
    y = np.tan(frustum.fov / 2)
    depth = frustum.scale / np.cbrt(y * y * frustum.aspect / 3)
    return frustum.position + tf.SO3(frustum.wxyz).as_matrix()[:, 2] * depth


def _project(camera, point: np.ndarray) -> tuple[float, float]:
    """``point``'s pixel in a client's camera (viser's: OpenCV axes, +Z forward, +Y down; the
    vertical fov; the browser's canvas size)."""
    x, y, z = tf.SO3(camera.wxyz).as_matrix().T @ (point - camera.position)
    assert z > 0, "the point is behind the camera"
    f = camera.image_height / 2 / np.tan(camera.fov / 2)
    return camera.image_width / 2 + f * x / z, camera.image_height / 2 + f * y / z


def _wait(predicate, timeout: float, what: str):
    """Poll ``predicate()`` until it is truthy; its value. Fails saying ``what`` did not happen."""
    end = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < end, f"{what} (after {timeout:g} s)"
        time.sleep(0.02)
    return value


CANVAS_RECT = """(() => {
  const area = (c) => c.width * c.height;
  const c = [...document.querySelectorAll('canvas')].sort((a, b) => area(b) - area(a))[0];
  const r = c.getBoundingClientRect();
  return [r.left, r.top, r.width, r.height];
})()"""


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium on PATH (Debian: apt-get install chromium)")
def test_chromium_click_on_a_frustum_flies_the_camera_there(tiny_scene_dir):
    """Issue 23, "click one to fly to it", as a person does it: a mouse click on an input camera's
    frustum in the page flies that browser's camera to the input camera."""
    view = 1
    with (
        ViewerApp(load_source(tiny_scene_dir), port=0, verbose=False) as app,
        HeadlessChromium(width=960, height=640) as browser,
    ):
        frustum = app._frusta[view]
        clicks = []
        frustum.on_click(clicks.append)  # besides the viewer's own handler
        browser.goto(app.url)
        client = _wait(
            lambda: next(iter(app.server.get_clients().values()), None), 30, "no browser connected"
        )
        reports = []  # the camera as the browser sends it
        client.camera.on_update(lambda cam: reports.append((cam.position.copy(), cam.wxyz.copy(), cam.fov)))
        assert app.wait_shown(20)  # the frusta have their images
        # The page settled in the initial view first: viser's client resets its camera to the initial
        # one in a React effect (InitialCameraSetter) that can run after a camera set right at connect.
        start = app.server.initial_camera.position
        _wait(lambda: np.allclose(client.camera.position, start, atol=1e-4), 20, "no initial camera")
        first = browser.wait_for_image(_steady(lambda im: _drawn(im) > 0.3), timeout=30, interval=0.2)
        assert _drawn(first) > 0.3, f"the viewer's page shows no scene ({_drawn(first):.0%} drawn)"

        # A known camera: in front of the frustum, looking back at its image's centre.
        target = _image_centre(frustum)
        forward = tf.SO3(frustum.wxyz).as_matrix()[:, 2]
        eye = target + forward * 2.5 * np.linalg.norm(target - frustum.position)
        n = len(reports)
        with client.atomic():
            client.camera.up_direction = app.source.cameras.up().numpy()
            client.camera.position = eye
            client.camera.look_at = target
        _wait(lambda: any(np.allclose(p, eye, atol=1e-4) for p, _, _ in reports[n:]), 20, "camera not set")
        u, v = _project(client.camera, target)  # the canvas centre, here; computed all the same
        left, top, width, height = browser.evaluate(CANVAS_RECT)
        x, y = left + u * width / client.camera.image_width, top + v * height / client.camera.image_height
        assert browser.evaluate(f"document.elementFromPoint({x}, {y}).tagName") == "CANVAS"

        def frustum_at_the_point(image):  # its image plane covers the pixels around it (not white)
            patch = image[int(y) - 5 : int(y) + 6, int(x) - 5 : int(x) + 6].astype(np.int16)
            return bool((np.abs(patch - 255).max(-1) > 40).all())

        before = browser.wait_for_image(_steady(frustum_at_the_point), timeout=20, interval=0.2)
        assert frustum_at_the_point(before), f"the frustum is not drawn at ({x:.0f}, {y:.0f})"

        np.testing.assert_allclose(client.camera.position, eye, atol=1e-4, err_msg="the camera moved away")
        looked = tf.SO3(client.camera.wxyz).as_matrix()[:, 2]
        assert float(looked @ forward) < -0.99  # facing the input camera, not looking along it

        n = len(reports)
        browser.click(x, y)
        _wait(lambda: clicks, 10, "the click on the frustum did not reach the server")
        assert clicks[0].client is client
        np.testing.assert_allclose(
            clicks[0].screen_pos[0],
            (u / client.camera.image_width, v / client.camera.image_height),
            atol=0.01,
        )
        _, wxyz, fov = _wait(
            lambda: next((r for r in reports[n:] if np.allclose(r[0], frustum.position, atol=1e-4)), None),
            10,
            f"the browser's camera did not fly to the frustum at {frustum.position}",
        )
        # the browser's camera is the input camera: where it is, looking where it looks
        assert float(tf.SO3(wxyz).as_matrix()[:, 2] @ forward) > 1 - 1e-6
        assert fov == pytest.approx(app.source.cameras.fov_y(view))
        np.testing.assert_allclose(client.camera.position, frustum.position, atol=1e-4)

        def changed(image):
            return float(np.abs(image.astype(np.int16) - before).mean()) > 10

        after = browser.wait_for_image(_steady(changed), timeout=10, interval=0.2)
        assert changed(after), "the page looks the same after the fly-to"
        assert not app._frusta[view].visible  # the camera it stands in is hidden: the scene shows
