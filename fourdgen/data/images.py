"""Prediction inputs for image-conditioned 4D video generation: an image (+ prompt) per clip.

``fourdgen predict --config <video recipe> --data fourdgen.data.images.ImagePromptDataModule
--data.images photo.png --data.prompts "a dog running"`` generates an RGB + pointmap clip per
image. Each sample is a :class:`GridBatch` of one view whose first frame is the image (resized to
cover ``height x width``, centre-cropped) and whose later frames are zeros: the conditioning only
reads the first frame. Cameras are placeholders (identity pose, ``fov_deg`` intrinsics); the
stage recovers real ones from the generated pointmaps.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fourdgen.backbones.image import CLIPImageEncoder, HashImageEncoder
from fourdgen.backbones.text import HashTextEncoder, UMT5TextEncoder
from fourdgen.batch import GridBatch
from fourdgen.data.datamodules import BaseDataModule, _resize, resize_crop_plan
from fourdgen.data.embeddings import ConditionEmbedder
from fourdgen.errors import FileFormatError, short_error
from fourdgen.geometry.cameras import intrinsics_from_fov

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(images: str | list[str]) -> list[Path]:
    """Image files from a file, a folder (its images, sorted) or a list of files."""
    items = [images] if isinstance(images, str) else list(images)
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"data.images: {p} is neither an image file nor a folder")
    if not out:
        raise FileNotFoundError(f"data.images: no images ({', '.join(IMAGE_SUFFIXES)}) in {items}")
    return out


def read_rgb(path: Path) -> Tensor:
    """An image file's pixels ``[3, H, W]`` uint8, through PIL: torchvision's ``decode_image``
    crashed the process (a segfault, no exception) on some damaged files. 16-bit images keep their
    high byte; palette, gray and alpha images become RGB. A file that does not decode is one
    :class:`~fourdgen.errors.FileFormatError` naming it."""
    from PIL import Image

    expected = f"a readable {'/'.join(IMAGE_SUFFIXES)} image"
    try:
        with Image.open(path) as im:
            im.load()  # decodes now: a truncated file raises here
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = (np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
                arr = np.repeat(arr[..., None], 3, axis=-1)
            else:
                arr = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's errors
        raise FileFormatError(path, "<image>", expected, short_error(e)) from None
    if arr.ndim != 3 or min(arr.shape[:2]) < 1:
        raise FileFormatError(path, "<image>", "an image of at least 1x1 pixels", list(arr.shape))
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def load_image(path: Path, height: int, width: int) -> Tensor:
    """``[3, height, width]`` in [-1, 1]: resized to cover, centre-cropped (see :func:`read_rgb`)."""
    img = read_rgb(path)
    size, top_left = resize_crop_plan(tuple(img.shape[-2:]), (height, width), "center", random.Random(0))
    img = _resize(img[None].float() / 255, size, top_left, (height, width), "bilinear")[0]
    return img.clamp(0, 1) * 2 - 1


class _ImagePrompts(Dataset):
    def __init__(self, dm: ImagePromptDataModule):
        self.dm = dm

    def __len__(self) -> int:
        return len(self.dm.images)

    def __getitem__(self, idx: int) -> GridBatch:
        dm, h = self.dm, self.dm.hparams
        path, T, H, W = dm.images[idx], h.num_frames, h.height, h.width
        rgb = torch.zeros(1, 1, T, 3, H, W)
        rgb[0, 0, 0] = load_image(path, H, W)
        b = GridBatch(
            rgb=rgb,
            K=intrinsics_from_fov(h.fov_deg, W, H)[None, None],
            w2c=torch.eye(4).expand(1, 1, T, 4, 4).clone(),
            observed=torch.arange(T)[None, None] == 0,
            times=torch.linspace(0, 1, T)[None] if T > 1 else torch.zeros(1, 1),
            view_ids=torch.zeros(1, 1, dtype=torch.long),
            time_ids=torch.arange(T)[None],
            caption=[dm.prompts[idx]],
            scene_id=[path.stem],
        )
        for k, v in dm.embedder(b.caption, rgb[:, 0, 0], [str(path.resolve())]).items():
            setattr(b, k, v)
        return b.validate()


class ImagePromptDataModule(BaseDataModule):
    """Images (+ prompts) to generate 4D clips from (``predict`` only).

    Args:
        images: an image file, a folder of images, or a list of files.
        prompts: one string for every image, or one per image. None: each image's sidecar
            ``<stem>.txt`` if present, else an empty prompt.
        num_frames / height / width: the generated clip's size (4DNeX: 49 x 480 x 720; frames
            ``4k + 1`` for Wan's temporal VAE factor 4).
        fov_deg: horizontal field of view of the placeholder intrinsics.
        text_encoder / image_encoder / prompt_suffix / negative_prompt / cache_dir: as the
            training DataModule's (:class:`ConditionEmbedder`); use the same ones.
        on_bad_sample: an image that does not decode: ``skip`` it (a warning naming the file, counted
            in :attr:`skipped`; the others are still generated) or ``error`` (stop before generating).
    """

    def __init__(
        self,
        images: str | list[str] = "inputs",
        prompts: str | list[str] | None = None,
        num_frames: int = 49,
        height: int = 480,
        width: int = 720,
        fov_deg: float = 60.0,
        text_encoder: HashTextEncoder | UMT5TextEncoder | None = None,
        image_encoder: CLIPImageEncoder | HashImageEncoder | None = None,
        prompt_suffix: str = "POINTMAP_STYLE.",
        negative_prompt: str = "",
        cache_dir: str | None = None,
        on_bad_sample: Literal["skip", "error"] = "skip",
        batch_size: int = 1,
        num_workers: int = 0,
    ):
        # Own arguments, explicitly (a wrapping DataModule's would be collected otherwise).
        skip = ("self", "__class__", "text_encoder", "image_encoder")
        args = {k: v for k, v in locals().items() if k not in skip}
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters(args)
        self.embedder = ConditionEmbedder(
            text_encoder, image_encoder, prompt_suffix, negative_prompt, cache_dir
        )
        self.images: list[Path] = []
        self.prompts: list[str] = []
        self.skipped = 0

    def _readable(self, path: Path) -> bool:
        """Decoded once here, before any generation: a bad image is skipped (warned, counted) or,
        with ``on_bad_sample: error``, stops the run; no loader worker meets it later."""
        try:
            load_image(path, 1, 1)
        except FileFormatError as e:
            if self.hparams.on_bad_sample == "error":
                raise
            self.skipped += 1
            warnings.warn(f"skipping a bad sample ({self.skipped} so far): {e}", stacklevel=2)
            return False
        return True

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        found = list_images(h.images)
        keep = [self._readable(p) for p in found]
        self.images = [p for p, ok in zip(found, keep, strict=True) if ok]
        if not self.images:
            raise FileFormatError(found[0], "<image>", "at least one readable image", f"{len(found)} skipped")
        if isinstance(h.prompts, str):
            self.prompts = [h.prompts] * len(self.images)
        elif h.prompts is not None:
            if len(h.prompts) != len(found):
                raise ValueError(
                    f"data.prompts: expected one prompt per image ({len(found)}), got {len(h.prompts)}"
                )
            self.prompts = [p for p, ok in zip(h.prompts, keep, strict=True) if ok]
        else:
            self.prompts = [
                p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else ""
                for p in self.images
            ]

    def predict_dataloader(self) -> DataLoader:
        return self._loader(_ImagePrompts(self), shuffle=False)
