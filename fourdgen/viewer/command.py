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
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fourdgen.viewer.load import load_source
from fourdgen.viewer.server import ViewerApp


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
