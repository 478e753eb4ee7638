"""Media helpers: image grids and videos to TensorBoard, and mp4 files.

``log_images`` / ``log_video`` accept whatever a LightningModule has at hand (``self.logger``,
``self.loggers``, a raw ``SummaryWriter`` or None) and return False without doing anything when
there is no TensorBoard writer (other loggers, non-zero DDP ranks), so modules call them
unconditionally.

TensorBoard's own ``add_video`` needs moviepy; we encode the GIF with imageio instead and write
the same ``Summary.Image`` protobuf that ``add_video`` would.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import imageio.v2 as iio2
import imageio.v3 as iio
import numpy as np
import torch
from lightning.fabric.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torchvision.utils import make_grid

from fourdgen.io import atomic_path


def _summary_writer(logger: Any) -> Any | None:
    """The SummaryWriter behind ``logger`` (Lightning TensorBoardLogger, a list of loggers, or
    a writer), or None. Lightning's rank>0 dummy experiment answers None to everything."""
    if logger is None:
        return None
    if isinstance(logger, Sequence):
        tb = [lg for lg in logger if isinstance(lg, TensorBoardLogger)]
        return _summary_writer(tb[0]) if tb else None
    writer = logger.experiment if isinstance(logger, TensorBoardLogger) else logger
    get_file_writer = getattr(writer, "_get_file_writer", None)
    if not callable(get_file_writer) or get_file_writer() is None:
        return None
    return writer


def _to_float01(x: Tensor) -> Tensor:
    x = x.detach().cpu()
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return x.nan_to_num(0.0).clamp(0, 1)


def _to_uint8_hwc(frames: Tensor) -> np.ndarray:
    """``[T, 3, H, W]`` float [0, 1] -> ``[T, H, W, 3]`` uint8."""
    return (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def log_images(logger: Any, tag: str, images: Tensor, step: int, max_images: int = 8, nrow: int = 8) -> bool:
    """Log ``images [N, 3, H, W]`` (or ``[3, H, W]``) in ``[0, 1]`` (or uint8) as one grid image.

    Only the first ``max_images`` are used; ``nrow`` images per grid row. Returns True if logged.
    """
    writer = _summary_writer(logger)
    if writer is None:
        return False
    images = _to_float01(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
    grid = make_grid(images[:max_images], nrow=nrow, padding=2, pad_value=1.0)
    writer.add_image(tag, grid, global_step=step, dataformats="CHW")
    return True


def encode_gif(frames: np.ndarray, fps: float) -> bytes:
    """Animated, looping GIF bytes of ``frames [T, H, W, 3]`` uint8."""
    return iio.imwrite("<bytes>", frames, extension=".gif", duration=1000.0 / fps, loop=0)


def log_video(
    logger: Any,
    tag: str,
    video: Tensor,
    step: int,
    fps: float = 8,
    max_videos: int = 4,
    nrow: int | None = None,
) -> bool:
    """Log ``video [T, 3, H, W]`` or ``[N, T, 3, H, W]`` in ``[0, 1]`` (or uint8) as an animated GIF.

    Several videos play side by side (first ``max_videos``, ``nrow`` per row, default about
    square). Shows in TensorBoard's Images tab, like ``add_video``. Returns True if logged.
    """
    writer = _summary_writer(logger)
    if writer is None:
        return False
    video = _to_float01(video)
    if video.ndim == 4:
        video = video[None]
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"expected video [T, 3, H, W] or [N, T, 3, H, W], got {tuple(video.shape)}")
    video = video[:max_videos]
    n = video.shape[0]
    if n > 1:
        nrow = nrow or math.ceil(math.sqrt(n))
        video = torch.stack(
            [make_grid(video[:, t], nrow=nrow, padding=2, pad_value=1.0) for t in range(video.shape[1])]
        )
    else:
        video = video[0]
    frames = _to_uint8_hwc(video)
    _, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=encode_gif(frames, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    return True


def save_video_mp4(
    path: str | os.PathLike, video: Tensor | np.ndarray, fps: float = 24, quality: float = 8
) -> str:
    """Write ``video`` as an H.264 mp4 at ``path`` atomically (temp file + ``os.replace``).

    ``video``: ``[T, H, W, 3]`` uint8, or float in ``[0, 1]``; ``[T, 3, H, W]`` is also accepted.
    Odd sizes are padded by one edge pixel (yuv420p needs even sizes; imageio would otherwise
    resize to multiples of 16). ``quality`` is imageio's 0-10 scale. Returns the path.
    """
    v = torch.as_tensor(video)
    if v.ndim != 4:
        raise ValueError(f"expected video [T, H, W, 3], got {tuple(v.shape)}")
    if v.shape[-1] != 3 and v.shape[1] == 3:  # channels-first
        v = v.permute(0, 2, 3, 1)
    if v.shape[-1] != 3:
        raise ValueError(f"expected video [T, H, W, 3], got {tuple(v.shape)}")
    frames = _to_uint8_hwc(_to_float01(v).permute(0, 3, 1, 2))
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")

    path = os.fspath(path)
    if not _has_ffmpeg():
        return _save_mp4_opencv(path, frames, fps)
    # Temp file + rename with the mode a plain open() gives (mkstemp's 0600 made mp4s private);
    # the .mp4 suffix tells ffmpeg the format.
    with (
        atomic_path(path, suffix=".mp4") as tmp,
        iio2.get_writer(
            tmp,
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            quality=quality,
            macro_block_size=1,
            ffmpeg_log_level="error",
        ) as writer,
    ):
        for frame in frames:
            writer.append_data(frame)
    return path


def _has_ffmpeg() -> bool:
    """Whether imageio can find an ffmpeg binary (imageio-ffmpeg's wheel, or IMAGEIO_FFMPEG_EXE)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return False
    return True


def _save_mp4_opencv(path: str, frames: np.ndarray, fps: float) -> str:
    """The fallback where no ffmpeg binary is installed but OpenCV is (clusters and containers
    often ship opencv-python-headless alone): MPEG-4 Part 2 ('mp4v'), which every player and
    imageio read, though larger than H.264. ``frames``: ``[T, H, W, 3]`` uint8 RGB."""
    try:
        import cv2
    except ImportError as e:
        raise RuntimeError(
            f"cannot write {path}: no ffmpeg binary (pip install imageio-ffmpeg) and no OpenCV"
        ) from e
    with atomic_path(path, suffix=".mp4") as tmp:
        h, w = frames.shape[1:3]
        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
        if not writer.isOpened():
            raise RuntimeError(f"cannot write {path}: OpenCV's VideoWriter did not open (mp4v, {w}x{h})")
        try:
            for frame in frames:
                writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV wants BGR
        finally:
            writer.release()
    return path
