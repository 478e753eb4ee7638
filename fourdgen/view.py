"""``fourdgen view``: look at a 4D scene in the browser, moving in time, from any angle.

::

    fourdgen view outputs/quickstart/checkpoints/last.ckpt       # the fitted field, at any time
    fourdgen view outputs/quickstart/scene                       # the fitter's PLY per frame
    fourdgen view runs/cat/video/cat                             # the pointmap writer's point clouds
    fourdgen view data/quickstart/orbit12                        # a scene folder: frames and cameras
    fourdgen view outputs/quickstart/scene --port 8081 --frame 3 --max-gaussians 50000

Open the printed address in a browser. It listens on 127.0.0.1 unless ``--host`` says otherwise
(``--host 0.0.0.0`` serves the whole network: only where that is wanted). The fly-through button
writes ``<out>/flythrough.mp4`` (``--out``; default ``<input>_view/`` beside the input).

What a path is, loaded into a :class:`~fourdgen.viewer.sources.Source`:

- a file: a stage-3 checkpoint (Lightning ``.ckpt`` whose state dict has ``splats.*``);
- a folder with ``scene.json``: a scene folder;
- a folder of per-frame PLYs (``frame_XXXX.ply``), or a folder holding one under ``ply/`` (the
  fitter's export), ``gaussians/`` (the reconstructor's) or ``points/`` (the pointmap writer's).
  Their cameras come from ``cameras.json`` beside the PLYs or one folder up.

Anything else raises one :class:`ViewerInputError` naming the path and the three kinds.

This sits above the stages (a checkpoint is rebuilt as the stage-3 fitter); the viewer package
below it serves any source.
"""

from __future__ import annotations

import argparse
import pickle
import time
import zipfile
from pathlib import Path

import torch

from fourdgen.data.datamodules import adjust_intrinsics, resize_crop_plan
from fourdgen.data.protocols import CAMERAS_KEY, SceneInfo
from fourdgen.data.scene import SCENE_FILE, read_scene
from fourdgen.stages.fit import Gaussian4DFitter
from fourdgen.viewer.cameras import ViewCameras, ViewerInputError, read_cameras_json
from fourdgen.viewer.server import ViewerApp
from fourdgen.viewer.sources import FitterSource, PlyFolderSource, SceneFolderSource, Source, ply_frames

EXPECTED = (
    "expected a stage-3 checkpoint (.ckpt), a folder of per-frame PLYs (frame_XXXX.ply, or a folder "
    "with ply/, gaussians/ or points/ holding them) or a scene folder (scene.json)"
)
PLY_SUBFOLDERS = ("ply", "gaussians", "points")
DEFAULT_FPS = 8.0  # PLY folders do not store their frame rate


def load_source(
    path: str | Path,
    scene: str | Path | None = None,
    fps: float | None = None,
    device: str = "cpu",
    max_points: int = 300_000,
) -> Source:
    """The :class:`Source` for ``path``; ``scene``: the scene folder a checkpoint was fitted to
    (default: the cameras the checkpoint holds, else its DataModule's ``scene``); ``fps``
    overrides the frame rate."""
    path = Path(path)
    if not path.exists():
        raise ViewerInputError(f"{path}: no such file or folder; {EXPECTED}")
    if path.is_file():
        if path.name == SCENE_FILE:
            return load_source(path.parent, scene, fps, device, max_points)
        source = load_checkpoint(path, scene, device)
    elif (path / SCENE_FILE).is_file():
        source = SceneFolderSource(read_scene(path), max_points)
    else:
        folder = next((f for f in [path, *(path / s for s in PLY_SUBFOLDERS)] if ply_frames(f)), None)
        if folder is None:
            raise ViewerInputError(f"{path}: a folder without scene.json or frame_XXXX.ply files; {EXPECTED}")
        cams = next(
            (f for f in (folder / "cameras.json", folder.parent / "cameras.json") if f.is_file()), None
        )
        source = PlyFolderSource(
            folder, ply_frames(folder), read_cameras_json(cams) if cams else None, DEFAULT_FPS
        )
    if fps is not None:
        source.fps = float(fps)
    return source


def _read_checkpoint(path: Path) -> dict:
    try:  # memory-mapped: refusing a big checkpoint of another stage reads little of it
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise ViewerInputError(f"{path}: not a readable PyTorch checkpoint ({first}); {EXPECTED}") from e


def load_checkpoint(path: Path, scene: str | Path | None = None, device: str = "cpu") -> FitterSource:
    """A stage-3 checkpoint as a :class:`FitterSource` on ``device``."""
    ckpt = _read_checkpoint(path)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "splats.means" not in state:
        raise ViewerInputError(
            f"{path}: a checkpoint, but not of the stage-3 fitter (no splats.* in its state_dict); {EXPECTED}"
        )
    # No LPIPS (its backbone is not needed to look at the scene) and no compile.
    module = Gaussian4DFitter.load_from_checkpoint(path, map_location=device, lpips_net=None, compile=False)
    module.eval()
    module.info = _scene_info(path, ckpt, scene)
    return FitterSource(module, path)


def _scene_info(path: Path, ckpt: dict, scene: str | Path | None) -> SceneInfo:
    """The cameras and times the fit used: those the checkpoint holds
    (:func:`~fourdgen.data.protocols.camera_record`), else the scene folder's (``scene``, or the
    checkpoint's DataModule's, at its resolution)."""
    stored = ckpt.get(CAMERAS_KEY)
    if stored is not None and scene is None:
        return SceneInfo(points=None, colors=None, **stored)
    dm = ckpt.get("datamodule_hyper_parameters") or {}
    folder = scene or dm.get("scene")
    if folder is None or not Path(folder).exists():
        raise ViewerInputError(
            f"{path}: the checkpoint does not hold its cameras and its scene folder "
            f"({folder or 'not recorded'}) is not there: give it with --scene"
        )
    s = read_scene(folder, check_files=False)
    hw = (
        (dm.get("height"), dm.get("width"))
        if dm.get("height") and dm.get("width") and scene is None
        else None
    )
    size, top_left = resize_crop_plan((s.height, s.width), hw, "center", None)
    holdout = list(dm.get("holdout_views") or [])
    H, W = hw or (s.height, s.width)
    return SceneInfo(
        K=torch.stack([adjust_intrinsics(k, (s.height, s.width), size, top_left) for k in s.K]),
        w2c=s.w2c,
        times=torch.linspace(0, 1, s.num_frames) if s.num_frames > 1 else torch.zeros(1),
        height=H,
        width=W,
        train_views=[v for v in range(s.num_views) if v not in holdout],
        holdout_views=holdout,
        points=None,
        colors=None,
        fps=s.fps,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fourdgen view",
        description=__doc__.split("::")[0].strip(),
        epilog="examples:\n" + __doc__.split("::")[1].split("\n\n", 2)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("path", help="a stage-3 checkpoint (.ckpt), a folder of per-frame PLYs, or a scene folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (the next free one if taken; 0: any free)")
    p.add_argument("--frame", type=float, default=0, help="frame shown first")
    p.add_argument(
        "--max-gaussians",
        type=int,
        default=None,
        help="send the browser at most this many Gaussians a frame, the most opaque (the mp4 uses all)",
    )
    p.add_argument(
        "--max-points", type=int, default=300_000, help="the same for point clouds (an even subset)"
    )
    p.add_argument(
        "--fps", type=float, default=None, help="playback rate (default: the scene's, PLY folders 8)"
    )
    p.add_argument(
        "--out", default=None, help="folder for flythrough.mp4 (default: <input>_view beside the input)"
    )
    p.add_argument("--path-frames", type=int, default=120, help="frames of the fly-through (Full-4D: 120)")
    p.add_argument(
        "--scene", default=None, help="the scene folder of a checkpoint that does not hold its cameras"
    )
    p.add_argument(
        "--device", default="auto", help="where the field and the mp4 renders run (auto: CUDA if any)"
    )
    return p


def default_out(path: Path) -> Path:
    """``<input>_view/`` beside the input: never the input folder (the fitter's export has its own
    flythrough.mp4)."""
    path = path.resolve()
    return path.parent / f"{path.stem if path.is_file() else path.name}_view"


def main(argv: list[str] | None = None, block: bool = True) -> ViewerApp:
    args = parser().parse_args(argv)
    for name in ("max_gaussians", "max_points", "path_frames"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(
                f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}"
            )
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    source = load_source(args.path, scene=args.scene, fps=args.fps, device=device, max_points=args.max_points)
    out = Path(args.out) if args.out else default_out(Path(args.path))
    app = ViewerApp(
        source,
        host=args.host,
        port=args.port,
        frame=args.frame,
        max_gaussians=args.max_gaussians,
        max_points=args.max_points,
        out_dir=out,
        path_samples=args.path_frames,
        device=device,
        verbose=False,
    )
    print(f"fourdgen view: {source.describe()}\nfourdgen view: open {app.url} (Ctrl+C stops)", flush=True)
    if not block:
        return app
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        app.stop()
    return app


__all__ = ["EXPECTED", "ViewCameras", "ViewerInputError", "load_checkpoint", "load_source", "main"]
