"""The official VGGT checkpoint layout (facebookresearch/vggt's ``model.pt`` / the Hugging Face
``model.safetensors``) and :class:`~fourdgen.backbones.vggt.VGGT`'s: :func:`load_official` maps it
on with every key used and none missing apart from the 4Real-Video-V2 additions;
:func:`official_state_dict` writes it back."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from fourdgen.backbones.vggt import VGGT
from fourdgen.errors import FileFormatError, short_error
from fourdgen.io import read_tensors

_DINO = "aggregator.patch_embed."
_ADDED = ("aggregator.temporal_blocks.",)  # 4Real-Video-V2 layers: not in official checkpoints


def _fourdgen_from_official(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official key/value layout -> this module's. DINOv2 adds the class position embedding to
    the class token; timm's ViT (no_embed_class) wants it folded in."""
    out = {}
    for k, v in sd.items():
        if k == _DINO + "pos_embed":
            out[k] = v[:, 1:]
        elif k == _DINO + "cls_token":
            out[k] = v + sd[_DINO + "pos_embed"][:, :1] if _DINO + "pos_embed" in sd else v
        elif k == _DINO + "register_tokens":
            out[_DINO + "reg_token"] = v
        elif k == _DINO + "mask_token":
            out["aggregator.dino_mask_token"] = v
        else:
            out[k] = v
    return out


def official_state_dict(model: VGGT) -> dict[str, Tensor]:
    """This module's weights in the official VGGT layout (4Real additions left out). The class
    position embedding is written as 0 with the class token carrying it (an equivalent model)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith(_ADDED):
            continue
        if k == _DINO + "pos_embed":
            out[k] = torch.cat([torch.zeros_like(v[:, :1]), v], dim=1)
        elif k == _DINO + "reg_token":
            out[_DINO + "register_tokens"] = v
        elif k == "aggregator.dino_mask_token":
            out[_DINO + "mask_token"] = v
        else:
            out[k] = v
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from ``.pt``/``.pth`` (optionally wrapped in ``{"model": ...}``) or
    ``.safetensors`` (the Hugging Face ``facebook/VGGT-1B`` layout)."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "model.pt"):
            if (path / name).exists():
                return read_state_dict(path / name)
        raise FileNotFoundError(f"{path}: no model.safetensors or model.pt in this folder")
    if not path.exists():
        raise FileNotFoundError(f"VGGT checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return read_tensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle of other objects than tensors
        raise FileFormatError(path, "<file>", "a torch.save'd VGGT state dict", short_error(e)) from None
    sd = sd.get("model", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise FileFormatError(path, "<file>", "a state dict (names -> tensors)", type(sd).__name__)
    return sd


def load_official(
    model: VGGT,
    checkpoint: str | os.PathLike | dict[str, Tensor],
    skip: tuple[str, ...] = (),
    source: str | None = None,
) -> None:
    """Load official VGGT weights into ``model``, every key used: a checkpoint key the model has
    no place for, or a model weight the checkpoint lacks (other than the 4Real additions), is an
    error naming the keys. ``skip``: key prefixes of heads deliberately left out of ``model``
    (e.g. ``("track_head.", "point_head.")``); they must exist in the checkpoint. ``source``: the
    name errors give a state dict (default: the path)."""
    source = source or ("state dict" if isinstance(checkpoint, dict) else str(checkpoint))
    sd = checkpoint if isinstance(checkpoint, dict) else read_state_dict(checkpoint)
    for prefix in skip:
        if getattr(model, prefix.rstrip("."), None) is not None:
            raise ValueError(f"skip={prefix!r} but the model has that head; build it without it")
        if not any(k.startswith(prefix) for k in sd):
            raise KeyError(f"{source}: skip={prefix!r} names no key of the checkpoint")
    mapped = _fourdgen_from_official({k: v for k, v in sd.items() if not k.startswith(skip or ("\0",))})
    own = model.state_dict()
    unexpected = sorted(set(mapped) - set(own))
    missing = sorted(k for k in set(own) - set(mapped) if not k.startswith(_ADDED))
    shapes = [
        f"{k}: {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}"
        for k in mapped
        if k in own and own[k].shape != mapped[k].shape
    ]
    if unexpected or missing or shapes:
        problems = [
            ("keys without a place in the model", unexpected),
            ("model weights missing from it", missing),
            ("shape mismatches", shapes),
        ]
        lines = [
            f"\n  {what}: {keys[:8]}{' ...' if len(keys) > 8 else ''}" for what, keys in problems if keys
        ]
        raise KeyError(f"{source} does not match VGGT({asdict(model.config)}):" + "".join(lines))
    model.load_state_dict(mapped, strict=False)
