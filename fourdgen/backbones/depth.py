"""Monocular depth from a local transformers depth-estimation checkpoint (Depth Anything V1/V2, DPT).

Full-4D uses Depth Anything V3, which transformers does not ship (``AutoModelForDepthEstimation``
knows ``depth_anything`` (V1 and V2 share that model type), ``dpt``, ``glpn``, ``zoedepth``,
``depth_pro``, ...; no V3). V2 predicts one image at a time, without cameras, so its output is
aligned per view afterwards (:mod:`fourdgen.geometry.depth_fusion`, :func:`~fourdgen.geometry.align.
align_depth`). Nothing is downloaded: the folder holds ``config.json``, the weights and the image
processor's ``preprocessor_config.json`` (``save_pretrained`` of both writes exactly that).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fourdgen.errors import ConfigError

# Model types whose raw ``predicted_depth`` is usable without model-specific post-processing, and
# what it holds. DA relative checkpoints and DPT (MiDaS) predict affine-invariant inverse depth;
# ZoeDepth (padding) and DepthPro (inverse depth scaled by a predicted field of view) are not.
_SPACES = {"depth_anything": None, "dpt": "disparity", "glpn": "depth"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class DepthEstimator:
    """Per-frame depth of a video with a local transformers checkpoint.

    Args:
        path: checkpoint folder (model + image processor config), loaded with ``local_files_only``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the model's weights.
        batch_size: frames per forward pass.

    Attributes:
        space: ``"disparity"`` (relative checkpoints: affine-invariant inverse depth) or ``"depth"``
            (metric checkpoints, ``depth_estimation_type == "metric"``).
    """

    def __init__(self, path: str, device: str = "auto", dtype: str = "float32", batch_size: int = 8):
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForDepthEstimation

        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(f"{path}: depth checkpoint folder not found (DepthEstimator.path)")
        if dtype not in _DTYPES:
            raise ConfigError(f"DepthEstimator.dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        if int(batch_size) < 1:
            raise ConfigError(f"DepthEstimator.batch_size: expected an integer >= 1, got {batch_size!r}")
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):  # transformers' own message is many lines long
            msg = f"{path}: not a transformers checkpoint (config.json missing or unreadable)"
            raise ConfigError(msg) from None
        model_type = getattr(config, "model_type", None)
        if model_type not in _SPACES:
            raise ConfigError(
                f"{path}: model_type {model_type!r} is not a supported depth-estimation checkpoint "
                f"(expected one of {sorted(_SPACES)})"
            )
        space = _SPACES[model_type]
        if space is None:  # Depth Anything: absent means relative, as in transformers' default
            kind = getattr(config, "depth_estimation_type", None) or "relative"
            space = "depth" if kind == "metric" else "disparity"
        self.space: str = space
        try:
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):
            msg = f"{path}: no image processor config (preprocessor_config.json) beside the model"
            raise ConfigError(msg) from None
        # The prediction is resized straight back to H x W: only a plain whole-image resize maps back.
        for flag in ("do_pad", "do_center_crop"):
            if getattr(self.processor, flag, False):
                raise ConfigError(f"{path}: image processor with {flag}=true is not supported (crops/pads)")
        self.path, self.batch_size = str(path), int(batch_size)
        self.device, self.dtype = resolve_device(device), _DTYPES[dtype]
        # Load in float32 and cast: keeps to from_pretrained arguments every transformers version has.
        model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def to(self, device: str | torch.device) -> DepthEstimator:
        """Move the model (in place); returns ``self``."""
        self.device = resolve_device(device)
        self.model.to(self.device)
        return self

    def preprocess(self, frames: Tensor) -> Tensor:
        """``frames [N, 3, H, W]`` in [0, 1] -> ``pixel_values [N, 3, h, w]`` on the model's device.

        The checkpoint's own image processor does it (size, keep_aspect_ratio, ensure_multiple_of,
        resample, mean/std from its config), on tensors and on the model's device, so a real
        checkpoint sees what it sees upstream. The inputs are already in [0, 1]: no rescale by 1/255.
        """
        out = self.processor(
            images=frames.float().to(self.device), do_rescale=False, return_tensors="pt", device=self.device
        )
        return out["pixel_values"].to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def __call__(self, frames: Tensor) -> Tensor:
        """``frames [T, 3, H, W]`` in [0, 1] -> ``[T, H, W]`` float32 on the model's device, in
        :attr:`space` (bilinear resize of the prediction back to ``H x W``)."""
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"DepthEstimator expects frames [T, 3, H, W], got {list(frames.shape)}")
        H, W = frames.shape[-2:]
        outs = []
        for chunk in frames.split(self.batch_size):
            pred = self.model(pixel_values=self.preprocess(chunk)).predicted_depth  # [n, h, w]
            pred = F.interpolate(pred[:, None].float(), size=(H, W), mode="bilinear", align_corners=False)
            outs.append(pred[:, 0])
        return torch.cat(outs)


def tiny_depth_anything_config(**kw):
    """A tiny random Depth Anything config (4 DINOv2 layers of width 32 at 42 px) for CPU tests and
    the tiny pipelines; ``kw`` go to ``DepthAnythingConfig`` (e.g. ``depth_estimation_type``)."""
    from transformers import DepthAnythingConfig, Dinov2Config

    backbone = Dinov2Config(  # 4 layers: the neck reads 4 distinct stages
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=42,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
    )
    return DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        initializer_range=0.05,  # large enough for the output to vary with the image
        **kw,
    )


def save_tiny_depth_anything(root: str | Path, seed: int = 0, **kw) -> Path:
    """Write a tiny random Depth Anything checkpoint (model + image processor) into ``root``: the
    same loading code as Depth Anything V2, with weights that mean nothing; returns ``root``."""
    from transformers import DepthAnythingForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    model = DepthAnythingForDepthEstimation(tiny_depth_anything_config(**kw)).eval()
    with torch.no_grad():  # a positive offset: the relative head's final ReLU would zero half the pixels
        model.head.conv3.bias.fill_(1e-3)
    model.save_pretrained(root)
    DPTImageProcessor(  # Depth Anything V2's processor settings, at 42 px instead of 518
        size={"height": 42, "width": 42},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(root)
    return Path(root)
