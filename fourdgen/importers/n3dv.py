"""Neural 3D Video (N3DV / DyNeRF): ``poses_bounds.npy`` + ``cam00.mp4 ... camNN.mp4`` -> a scene.

Each camera is a static view over the clip (V cameras, T frames); rows of ``poses_bounds.npy``
follow the sorted video names (:mod:`fourdgen.importers.llff` converts them). ``cam00`` is the
held-out test camera of the benchmark: the scene records its index as ``holdout_views``
(``--data.init_args.holdout_views`` of the fitter). Frames are decoded one at a time into a
memory-mapped array, so a 21-camera, 300-frame clip never sits in memory.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import imageio.v2 as iio
import numpy as np
from PIL import Image

from fourdgen.data.scene import SceneFormatError
from fourdgen.importers.common import WRITER, write_imported
from fourdgen.importers.llff import llff_intrinsics, llff_to_opencv_w2c, read_poses_bounds
from fourdgen.io import claim_output_dir

TEST_CAMERA = "cam00"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--holdout", default=TEST_CAMERA, help="the held-out camera's name (N3DV: cam00)")


def _video_info(path: Path) -> tuple[int, int, float, int]:
    """``(width, height, fps, frames)``: the frame count from the container (decoding checks it)."""
    try:
        with iio.get_reader(path, format="FFMPEG") as r:
            meta = r.get_meta_data()
            n = meta.get("nframes", float("inf"))
            n = r.count_frames() if not np.isfinite(n) else int(n)
    except (OSError, RuntimeError, IndexError) as e:
        raise SceneFormatError(
            path, "<video>", "a readable mp4", str(e).splitlines()[0] if str(e) else "unreadable"
        ) from e
    (w, h), fps = meta["size"], float(meta.get("fps", 30.0))
    return w, h, fps, n


def import_scene(
    src: str | Path,
    dst: str | Path,
    *,
    holdout: str = TEST_CAMERA,
    downscale_factor: int = 1,
    max_frames: int | None = None,
    frame_format: str = "png",
    fps: float | None = None,
    overwrite: bool = False,
) -> list[Path]:
    src, dst = Path(src), Path(dst)
    videos = sorted(src.glob("cam*.mp4"))
    if not videos:
        raise SceneFormatError(src, "<folder>", "camNN.mp4 videos beside poses_bounds.npy", "none found")
    pb = src / "poses_bounds.npy"
    c2w, hwf, bounds = read_poses_bounds(pb, len(videos))
    infos = [_video_info(v) for v in videos]
    W, H, video_fps, _ = infos[0]
    for v, (w, h, _, _) in zip(videos, infos, strict=True):
        if (w, h) != (W, H):
            raise SceneFormatError(v, "<size>", f"{W}x{H} like {videos[0].name}", f"{w}x{h}")
    w, h = W // downscale_factor, H // downscale_factor
    T = min(i[3] for i in infos)
    T = min(T, max_frames) if max_frames else T
    K = llff_intrinsics(hwf, w, h)
    w2c = llff_to_opencv_w2c(c2w)
    claim_output_dir(dst, WRITER, overwrite=overwrite, what="import n3dv")  # before decoding anything
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.frames.", suffix=".npy")
    os.close(fd)
    rgb = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(videos), T, h, w, 3))
    try:
        got = T
        for v, path in enumerate(videos):
            with iio.get_reader(path, format="FFMPEG") as reader:
                t = -1
                for t, frame in enumerate(reader):
                    if t >= T:
                        break
                    if downscale_factor > 1:  # area filter, as common.downscale
                        frame = np.asarray(Image.fromarray(frame[..., :3]).resize((w, h), Image.BOX))
                    rgb[v, t] = frame[..., :3]
                got = min(got, t + 1 if t < T else T)
        if got == 0:
            raise SceneFormatError(
                src, "<videos>", "decodable frames in every camNN.mp4", "a video without any"
            )
        names = [p.stem for p in videos]
        extra = {"bounds": bounds.tolist()}
        if holdout in names:
            extra["holdout_views"] = [names.index(holdout)]
        return [
            write_imported(
                dst,
                rgb[:, :got],
                K,
                w2c,
                source=src,
                fmt="n3dv",
                fps=fps or video_fps,
                view_names=names,
                extra=extra,
                frame_format=frame_format,
                overwrite=overwrite,
            )
        ]
    finally:
        del rgb
        os.unlink(tmp)
