"""The viser app: a :class:`~fourdgen.viewer.sources.Source` in the browser, moving in time.

GUI: a time slider (frames; a fitted scene also takes the times between them), play/pause and fps;
the input cameras as frusta (click one to fly there); the interpolated camera path, and a button
that renders the fly-through on the server to mp4.

Gaussians are drawn by the browser (viser's splat renderer sorts and blends them on the client's
GPU), so the server only sends a frame's Gaussians when the time changes: 32 bytes a Gaussian, ~4 MB
at 120k. Rendering them on the server instead would cost a rasterization per camera move, which the
CPU rasterizer does not do interactively at that size (``benchmarks/RESULTS.md``, "Viewer").

Scene updates happen on one worker thread, latest request first: dragging the slider or playing
faster than frames can be made skips the stale times rather than queueing them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch
import viser

from fourdgen.gaussians.container import knn_mean_distance
from fourdgen.geometry.cameras import focus_point
from fourdgen.viewer.cameras import pose_wxyz_position
from fourdgen.viewer.flythrough import write_flythrough
from fourdgen.viewer.sources import LRU, Frame, Source
from fourdgen.viewer.splats import even_subset, top_opacity, viser_splats

CONTINUOUS_STEP = 0.05  # slider step (in frames) for a fitted scene: the field is smooth in time
FRUSTUM_IMAGE_PX = 160  # longest side of the images on the frusta (sent on every time change)
INITIAL_FOV = np.deg2rad(50.0)  # vertical: a little wider than the input cameras, for context
POINT_KINDS = ("point-ply", "scene")  # sources whose frames are point clouds


class ViewerApp:
    """Serve ``source`` on ``host:port`` (port 0: a free one; see :attr:`url`).

    Args:
        frame: the frame shown first.
        max_gaussians: the browser gets at most this many Gaussians a frame, the most opaque
            (the fly-through renders all of them).
        max_points: the same for point clouds (an even subset).
        out_dir: where the fly-through button writes ``flythrough.mp4``.
        path_samples: frames of the fly-through.
        device: where server renders run.
    """

    def __init__(
        self,
        source: Source,
        host: str = "127.0.0.1",
        port: int = 8080,
        frame: float = 0,
        max_gaussians: int | None = None,
        max_points: int | None = 300_000,
        out_dir: str | Path | None = None,
        path_samples: int = 120,
        device: str = "cpu",
        verbose: bool = True,
    ):
        self.source, self.max_gaussians, self.max_points = source, max_gaussians, max_points
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device, self.verbose = device, verbose
        self._cache = LRU(32)
        self._cv = threading.Condition()
        self._want: float | None = None
        self._busy = False
        self._shown: float | None = None
        self._version = 0  # bumped by refresh(): cached frames of an older scene are stale
        self._stopping = threading.Event()
        self._play_event = threading.Event()
        self._splats = self._points = None
        self._point_size: float | None = None
        self.last_video: Path | None = None
        self._playing = False
        self.server = viser.ViserServer(host=host, port=port, verbose=verbose)
        self.server.gui.configure_theme(control_width="medium")
        # The frustum of the input camera a browser stands in after a fly-to: hidden (its image plane
        # would fill that browser's view) until the camera leaves it. ``_arrived``: seen there once.
        self._inside: int | None = None
        self._arrived = False
        self._watched: set[int] = set()
        self._frusta = self._add_cameras()
        self._add_gui(frame, path_samples)
        self._add_path()
        self._threads = [
            threading.Thread(target=self._render_loop, name="fourdgen-view-render", daemon=True),
            threading.Thread(target=self._play_loop, name="fourdgen-view-play", daemon=True),
        ]
        for th in self._threads:
            th.start()
        self._request(self.frame)

    # ------------------------------------------------------------------------------ public API
    @property
    def url(self) -> str:
        host = self.server.get_host()
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.server.get_port()}"

    @property
    def frame(self) -> float:
        """The frame on the slider (fractional for a fitted scene)."""
        return float(self._slider.value)

    def set_frame(self, frame: float, wait: float | None = None) -> None:
        """Move the time slider (as a user would); ``wait`` seconds at most for the scene to follow."""
        self._slider.value = float(frame)  # its on_update requests the frame
        if wait:
            self.wait_shown(wait)

    def wait_shown(self, timeout: float = 30.0) -> bool:
        """Block until the scene on the clients is the one for the slider's time."""
        end = time.monotonic() + timeout
        with self._cv:
            while self._want is not None or self._busy or self._shown != self.frame:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def refresh(self) -> None:
        """The source changed (the live viewer's scene after more steps): show it again."""
        with self._cv:
            self._version += 1
        self._request(self.frame)

    def render_flythrough(self) -> Path:
        """The fly-through button: render the path on the server and write ``flythrough.mp4``."""
        out = (self.out_dir or self.source.path.parent) / "flythrough.mp4"
        n = int(self._samples.value)
        self._video_status.content = f"rendering {n} frames ..."

        def progress(i: int, n: int) -> None:
            if i % 10 == 0 or i == n:
                self._video_status.content = f"rendering {i}/{n} frames ..."

        path = write_flythrough(
            self.source, out, n, fps=self._fps.value, device=self.device, progress=progress
        )
        self.last_video = path
        self._video_status.content = f"wrote `{path}`"
        if self.verbose:
            print(f"fourdgen view: wrote {path}", flush=True)
        return path

    def stop(self) -> None:
        self._stopping.set()
        self._play_event.set()
        with self._cv:
            self._cv.notify_all()
        for th in self._threads:
            th.join(timeout=10)
        self.server.stop()

    def __enter__(self) -> ViewerApp:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------ GUI
    def _add_gui(self, frame: float, path_samples: int) -> None:
        src, gui = self.source, self.server.gui
        gui.add_markdown(f"**{src.kind}** `{src.path.name}`: {src.num_frames} frames")
        last = max(src.num_frames - 1, 0)
        with gui.add_folder("Time"):
            step = CONTINUOUS_STEP if src.continuous else 1.0
            self._slider = gui.add_slider(
                "frame",
                min=0.0,
                max=float(max(last, 1)),
                step=step,
                initial_value=float(min(max(frame, 0), last)),
            )
            self._slider.disabled = last == 0
            self._play = gui.add_button("Play", icon=viser.Icon.PLAYER_PLAY, disabled=last == 0)
            self._fps = gui.add_number("fps", initial_value=float(src.fps), min=0.5, max=120.0, step=0.5)
        self._slider.on_update(lambda _: self._request(self.frame))
        self._play.on_click(lambda _: self._toggle_play())
        with gui.add_folder("Cameras"):
            self._show_cams = gui.add_checkbox("input cameras", initial_value=True)
            self._show_path = gui.add_checkbox("camera path", initial_value=True)
            self._samples = gui.add_number("path frames", initial_value=path_samples, min=2, max=2000, step=1)
            self._render_btn = gui.add_button("Render fly-through (mp4)", icon=viser.Icon.MOVIE)
            self._video_status = gui.add_markdown("")
        has_cams = src.cameras is not None
        for h in (self._show_cams, self._show_path, self._samples, self._render_btn):
            h.disabled = not has_cams
        if not has_cams:
            self._video_status.content = "no cameras.json found: no camera path"
        self._show_cams.on_update(lambda _: self._show_frusta())
        self._show_path.on_update(lambda _: self._set_visible(self._path_nodes, self._show_path.value))
        self._render_btn.on_click(lambda _: self._render_clicked())
        with gui.add_folder("Display", visible=src.kind in POINT_KINDS):
            self._size = gui.add_slider("point size", min=0.1, max=5.0, step=0.1, initial_value=1.0)
        self._size.on_update(lambda _: self._request(self.frame, force=True))

    def _toggle_play(self) -> None:
        self._playing = not self._playing
        if self._playing:
            self._play_event.set()
        else:
            self._play_event.clear()
        self._play.label = "Pause" if self._playing else "Play"
        self._play.icon = viser.Icon.PLAYER_PAUSE if self._playing else viser.Icon.PLAYER_PLAY

    def _render_clicked(self) -> None:
        self._render_btn.disabled = True
        try:
            self.render_flythrough()
        except Exception as e:  # shown in the browser: the server keeps serving
            self._video_status.content = f"failed: {e}"
            raise
        finally:
            self._render_btn.disabled = False

    @staticmethod
    def _set_visible(handles, visible: bool) -> None:
        for h in handles:
            h.visible = visible

    def _show_frusta(self) -> None:
        for v, h in enumerate(self._frusta):
            h.visible = self._show_cams.value and v != self._inside

    # ---------------------------------------------------------------------------- cameras/path
    def _add_cameras(self) -> list:
        cams, scene = self.source.cameras, self.server.scene
        if cams is None:
            return []
        up = cams.up().numpy()
        scene.set_up_direction(tuple(float(x) for x in up))
        self._frustum_scale = 0.05 * cams.extent()
        handles = []
        for v in range(cams.num_views):
            wxyz, pos = pose_wxyz_position(cams.at(0)[v])
            h = scene.add_camera_frustum(
                f"/cameras/{cams.names[v]}",
                fov=cams.fov_y(v),
                aspect=cams.width / cams.height,
                scale=self._frustum_scale,
                thickness=0.03 * self._frustum_scale,
                color=(40, 90, 200) if v in cams.path_views else (200, 90, 40),
                wxyz=wxyz,
                position=pos,
            )
            h.on_click(lambda event, v=v: self._fly_to(event.client, v))
            handles.append(h)
        # Start at the first path camera, drawn back a little and raised, looking where the cameras
        # look: the scene as it was filmed. (Farther out can be outside a background dome.)
        w2c0 = cams.at(0)
        look = focus_point(w2c0[cams.path_views]).double().numpy()
        _, pos = pose_wxyz_position(w2c0[cams.path_views[0]])
        dist = max(float(np.linalg.norm(pos - look)), 1e-3)
        self.server.initial_camera.look_at = tuple(look)
        self.server.initial_camera.position = tuple(look + (pos - look) * 1.15 + up * 0.15 * dist)
        self.server.initial_camera.up = tuple(float(x) for x in up)
        self.server.initial_camera.fov = INITIAL_FOV
        return handles

    def _fly_to(self, client: viser.ClientHandle | None, view: int) -> None:
        """Put the clicking client's camera where input camera ``view`` is at the current time."""
        if client is None:
            return
        cams = self.source.cameras
        wxyz, pos = pose_wxyz_position(cams.at(self.source.index(self._t()))[view])
        self._inside, self._arrived = view, False
        self._show_frusta()
        if client.client_id not in self._watched:
            self._watched.add(client.client_id)
            client.camera.on_update(self._camera_moved)
        with client.atomic():
            client.camera.fov = cams.fov_y(view)
            client.camera.wxyz = wxyz
            client.camera.position = pos

    def _camera_moved(self, camera: viser.CameraHandle) -> None:
        """Show the hidden frustum again once the browser that flew into it has left it (updates sent
        before the fly-to arrived are ignored: only leaving after arriving counts)."""
        view = self._inside
        if view is None:
            return
        _, pos = pose_wxyz_position(self.source.cameras.at(self.source.index(self._t()))[view])
        near = float(np.linalg.norm(np.asarray(camera.position) - pos)) < 0.5 * self._frustum_scale
        if near:
            self._arrived = True
        elif self._arrived:
            self._inside = None
            self._show_frusta()

    def _add_path(self) -> None:
        self._path_nodes = []
        cams = self.source.cameras
        if cams is None:
            return
        _, path = cams.path(max(int(self._samples.value), 8))
        centres = torch.linalg.inv(path.double())[:, :3, 3].numpy()
        closed = len(cams.path_views) > 1
        self._path_nodes.append(
            self.server.scene.add_spline_catmull_rom(
                "/camera_path",
                points=centres,
                closed=closed,
                thickness=0.03 * self._frustum_scale,
                color=(230, 170, 30),
            )
        )

    # ------------------------------------------------------------------------------- frames
    def _t(self, frame: float | None = None) -> float:
        last = self.source.num_frames - 1
        return 0.0 if last == 0 else min(max((self.frame if frame is None else frame) / last, 0.0), 1.0)

    def _request(self, frame: float, force: bool = False) -> None:
        with self._cv:
            self._want = frame
            if force:
                self._version += 1
            self._cv.notify_all()

    def _render_loop(self) -> None:
        while not self._stopping.is_set():
            with self._cv:
                while self._want is None and not self._stopping.is_set():
                    self._cv.wait()  # no polling: an idle viewer must not wake (the live fit's cores)
                if self._stopping.is_set():
                    return
                frame, self._want, self._busy = self._want, None, True
            try:
                self._show(frame)
            except Exception as e:  # keep serving; say what went wrong
                print(f"fourdgen view: could not show frame {frame:g}: {e}", flush=True)
            finally:
                with self._cv:
                    self._busy = False
                    self._shown = frame
                    self._cv.notify_all()

    def _arrays(self, frame: float) -> tuple[str, dict]:
        t = self._t(frame)
        key = (self._version, round(t, 6) if self.source.continuous else self.source.index(t))

        def make() -> tuple[str, dict]:
            f: Frame = self.source.frame(t)
            if f.gaussians is not None:
                return "gaussians", viser_splats(top_opacity(f.gaussians, self.max_gaussians))
            keep = even_subset(len(f.points), self.max_points)
            return "points", {
                "points": f.points[keep].float().numpy(),
                "colors": (f.colors[keep].clamp(0, 1) * 255).round().to(torch.uint8).numpy(),
            }

        return self._cache.get(key, make)

    def _show(self, frame: float) -> None:
        kind, arrays = self._arrays(frame)
        scene = self.server.scene
        index = self.source.index(self._t(frame))
        with self.server.atomic():
            if kind == "gaussians":
                if self._splats is None:
                    self._splats = scene.add_gaussian_splats("/scene/gaussians", **arrays)
                else:
                    self._splats.set_gaussians(**arrays)
            else:
                size = self._base_point_size(arrays["points"]) * float(self._size.value)
                self._points = scene.add_point_cloud(
                    "/scene/points", point_size=size, point_shape="circle", precision="float32", **arrays
                )
            self._update_frusta(index)

    def _base_point_size(self, points: np.ndarray) -> float:
        """The typical spacing of the points, measured once on a fixed subset of 4000 (spacing on
        a surface shrinks as the square root of the density: scaled back to all the points)."""
        if self._point_size is None:
            sub = torch.from_numpy(points[even_subset(len(points), 4000)])
            if len(sub) > 3:
                spacing = float(knn_mean_distance(sub, k=3).median())
                self._point_size = spacing * (len(sub) / len(points)) ** 0.5
            else:
                self._point_size = 0.01 * (self.source.cameras.extent() if self.source.cameras else 1.0)
        return self._point_size

    def _update_frusta(self, index: int) -> None:
        cams = self.source.cameras
        if cams is None:
            return
        if cams.w2c.shape[1] > 1:  # moving cameras follow the time
            for v, h in enumerate(self._frusta):
                h.wxyz, h.position = pose_wxyz_position(cams.at(index)[v])
        images = self.source.view_images(index)
        if images is not None:
            for h, image in zip(self._frusta, images, strict=True):
                step = max(1, int(np.ceil(max(image.shape[:2]) / FRUSTUM_IMAGE_PX)))
                h.image = np.ascontiguousarray(image[::step, ::step])

    # ------------------------------------------------------------------------------- playback
    def _play_loop(self) -> None:
        while not self._stopping.is_set():
            self._play_event.wait()  # paused: asleep until Play (or stop)
            last = time.monotonic()
            while self._playing and not self._stopping.is_set():
                fps = max(float(self._fps.value), 0.5)
                time.sleep(max(0.0, 1.0 / fps - (time.monotonic() - last)))
                last = time.monotonic()
                if self.source.num_frames < 2 or not self.wait_shown(timeout=5.0):
                    continue  # slower than fps: play as fast as frames come
                # One frame a tick: the playback speed is fps in the scene's own frames.
                self._slider.value = (round(self.frame) + 1) % self.source.num_frames
