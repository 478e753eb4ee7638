"""LoRA on the Wan DiT with peft, exported in the format diffusers loads.

Adapters are written as ``pytorch_lora_weights.safetensors`` (``WanPipeline.save_lora_weights``),
which a stock diffusers ``WanTransformer3DModel.load_lora_adapter`` or ``WanPipeline.load_lora_weights``
reads. Every other trained tensor (domain embeddings, control links, new layers) goes to
``fourdgen_extra.safetensors`` beside it: 4DNeX's release shipped only the LoRA and its domain
embeddings were lost, so both files are always written together.

:func:`load_lora` also reads 4DNeX's official release (:func:`load_4dnex_release`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor, nn

from fourdgen.errors import FileFormatError, short_error
from fourdgen.io import check_tensor, read_tensors

LORA_FILE = "pytorch_lora_weights.safetensors"
EXTRA_FILE = "fourdgen_extra.safetensors"
ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # 4DNeX
DOMAIN_FILE_4DNEX = "learnable_domain_embeddings.pt"  # official 4DNeX release (FrozenBurning/4DNex-Lora)
LORA_SCALE_4DNEX = 0.5  # official core/inference/wan.py: fuse_lora(lora_scale=0.5) = alpha 32 / rank 64


def add_lora(
    transformer: nn.Module,
    rank: int = 64,
    alpha: float = 32,
    targets: tuple[str, ...] = ATTN_TARGETS,
    adapter_name: str = "default",
    keep_trainable: tuple[str, ...] = ("domain_embedding",),
) -> nn.Module:
    """Inject a LoRA adapter (B zero-initialised: the model is unchanged at first). Base weights
    must be loaded before this (peft renames ``to_q.weight`` to ``to_q.base_layer.weight``).

    peft freezes every other parameter; those whose names contain one of ``keep_trainable`` (new
    layers such as the domain embedding) are made trainable again.
    """
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    transformer.add_adapter(cfg, adapter_name=adapter_name)
    for name, p in transformer.named_parameters():
        if any(k in name for k in keep_trainable):
            p.requires_grad_(True)
    return transformer


def extra_trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """Trainable tensors that are not LoRA weights (e.g. ``patch_embedding.domain_embedding``)."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad and "lora_" not in n}


def _full(t: Tensor) -> Tensor:
    # FSDP2 shards are DTensors: gather before saving.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save_lora(
    transformer: nn.Module,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    extra: dict[str, Tensor] | None = None,
    write: bool = True,
) -> Path:
    """Write the adapter (diffusers format) and ``extra`` tensors (default: all non-LoRA trainable
    parameters). Files are written in a temp dir and moved into place, so a crash leaves the old
    export intact. Under FSDP every rank must call this (gathering shards is collective); only
    the one with ``write=True`` writes."""
    out = Path(out_dir)
    lora = {
        k: _full(v).contiguous().cpu()
        for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()
    }
    extra = extra_trainable_state(transformer) if extra is None else extra
    extra = {k: _full(v).contiguous().cpu() for k, v in extra.items()}
    if not write:
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        # The adapter config travels in the file's metadata, but some loaders ignore it (diffusers'
        # load_lora_adapter given a file path assumes alpha = rank). So alpha / rank is baked
        # into the B matrices and the metadata says alpha = rank: every loader then agrees.
        cfg = transformer.peft_config[adapter_name]
        if cfg.rank_pattern or cfg.alpha_pattern:
            raise NotImplementedError("save_lora: per-module rank/alpha patterns are not supported")
        scale = cfg.lora_alpha / cfg.r
        lora = {k: v * scale if "lora_B" in k else v for k, v in lora.items()}
        meta = {**cfg.to_dict(), "lora_alpha": cfg.r}
        meta = {k: (list(v) if isinstance(v, set) else v) for k, v in meta.items()}
        write_diffusers_lora(tmp, lora, meta)
        save_file(extra, os.path.join(tmp, EXTRA_FILE))
        for name in (LORA_FILE, EXTRA_FILE):
            os.replace(os.path.join(tmp, name), out / name)
    return out


def write_diffusers_lora(folder: str | os.PathLike, lora: dict[str, Tensor], metadata: dict) -> None:
    """``folder/pytorch_lora_weights.safetensors`` as ``WanPipeline.save_lora_weights`` writes it
    (keys ``transformer.<module>.lora_A/B.weight``, adapter config in the metadata)."""
    from diffusers import WanPipeline

    WanPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=lora,
        safe_serialization=True,
        transformer_lora_adapter_metadata=metadata,
    )


def _lora_modules(file: Path, sd: dict[str, Tensor], transformer: nn.Module, prefix: str) -> dict:
    """Check a diffusers LoRA state dict against ``transformer`` before anything is loaded (peft
    would ignore unknown keys and missing halves with a log line, and cast integer tensors):
    ``{module name: (lora_A, lora_B)}``. Every key is ``<prefix><linear>.lora_A/B.weight`` of a
    linear layer of the DiT, both halves are there, A is ``[r, in]``, B ``[out, r]``, floats, finite."""
    if not sd:
        raise FileFormatError(file, "<tensors>", "LoRA weights (<module>.lora_A/B.weight)", "no tensors")
    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in sd.items():
        m = re.fullmatch(rf"{re.escape(prefix)}(.+)\.(lora_[AB])\.weight", key)
        if m is None or m.group(1) not in linears:
            example = f"{prefix}{next(iter(linears), 'blocks.0.attn1.to_q')}.lora_A.weight"
            raise FileFormatError(
                file, key, f"a LoRA weight of a linear layer of this DiT (e.g. {example})", "no such layer"
            )
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    out = {}
    for name, halves in pairs.items():
        for half in ("lora_A", "lora_B"):
            if half not in halves:
                raise FileFormatError(
                    file, f"{prefix}{name}.{half}.weight", "both lora_A and lora_B of the layer", "missing"
                )
        lin, a, b = linears[name], halves["lora_A"], halves["lora_B"]
        rank = a.shape[0] if a.ndim == 2 else -1
        check_tensor(file, f"{prefix}{name}.lora_A.weight", a, (max(rank, 1), lin.in_features))
        check_tensor(file, f"{prefix}{name}.lora_B.weight", b, (lin.out_features, rank))
        out[name] = (a, b)
    return out


def load_lora(
    transformer: nn.Module,
    lora_dir: str | os.PathLike,
    adapter_name: str = "default",
    strict_extra: bool = True,
) -> nn.Module:
    """Load an adapter written by :func:`save_lora` (or any diffusers Wan LoRA) and the extra
    tensors into ``transformer`` (which must already have the modules they belong to)."""
    d = Path(lora_dir)
    if not (d / LORA_FILE).is_file():
        raise FileNotFoundError(f"{d}: no {LORA_FILE} (expected a fourdgen/diffusers LoRA export)")
    if (d / DOMAIN_FILE_4DNEX).is_file() and not (d / EXTRA_FILE).is_file():
        return load_4dnex_release(transformer, d, adapter_name=adapter_name)
    sd = read_tensors(d / LORA_FILE)
    _lora_modules(d / LORA_FILE, sd, transformer, "transformer.")
    # A state dict, not the file: the file's adapter metadata (rank/alpha) is skipped either way,
    # alpha is baked into B
    transformer.load_lora_adapter(sd, adapter_name=adapter_name, prefix="transformer")
    if (d / EXTRA_FILE).is_file():
        load_extra(transformer, d / EXTRA_FILE, strict=strict_extra)
    return transformer


def load_extra(transformer: nn.Module, file: Path, strict: bool = True, what: str = "parameter") -> None:
    """Copy the tensors of ``fourdgen_extra.safetensors`` into the parameters of the same names,
    each checked first (a name without a parameter, another shape or dtype, NaN: one error naming it)."""
    extra = read_tensors(file)
    params = dict(transformer.named_parameters())
    missing = [k for k in extra if k not in params]
    if missing and strict:
        raise FileFormatError(
            file,
            missing[0],
            f"the name of a {what} of the model (install the same components, e.g. width "
            "fusion or the same link_layers, before loading)",
            "no such parameter",
        )
    for k, v in extra.items():
        if k in params:
            check_tensor(file, k, v, tuple(params[k].shape))
    with torch.no_grad():
        for k, v in extra.items():
            if k in params:
                params[k].copy_(v)


def load_4dnex_release(
    transformer: nn.Module,
    folder: str | os.PathLike,
    lora_scale: float = LORA_SCALE_4DNEX,
    adapter_name: str = "default",
) -> nn.Module:
    """Load 4DNeX's official release into a width-fused DiT (``WidthFusion`` installed).

    Layout (official ``core/finetune/trainer.py`` and ``core/inference/wan.py``):
    ``pytorch_lora_weights.safetensors`` written by ``save_lora_weights`` without adapter metadata
    (keys ``transformer.<module>.lora_A/B.weight``; loaders then assume alpha = rank), fused at
    ``lora_scale`` 0.5, and ``learnable_domain_embeddings.pt``, a ``[2, dim]`` tensor added to the
    RGB and XYZ width halves after patch embedding. The LoRA stays a trainable adapter with the scale
    baked into B (``W + 0.5 B A``, what ``fuse_lora(lora_scale=0.5)`` computes); the embeddings go
    to ``patch_embedding.domain_embedding``.
    """
    d = Path(folder)
    sd = read_tensors(d / LORA_FILE)
    _lora_modules(d / LORA_FILE, sd, transformer, "transformer.")
    lora = {k: v * lora_scale if "lora_B" in k else v for k, v in sd.items()}
    transformer.load_lora_adapter(lora, adapter_name=adapter_name, prefix="transformer")
    try:
        emb = torch.load(d / DOMAIN_FILE_4DNEX, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle of other objects
        raise FileFormatError(
            d / DOMAIN_FILE_4DNEX, "<file>", "a torch.save'd [2, dim] tensor", short_error(e)
        ) from None
    check_tensor(d / DOMAIN_FILE_4DNEX, "<tensor>", emb)
    target = getattr(transformer.patch_embedding, "domain_embedding", None)
    if target is None or tuple(target.shape) != tuple(emb.shape):
        raise ValueError(
            f"{d / DOMAIN_FILE_4DNEX}: a {tuple(emb.shape)} domain embedding needs a DiT with width fusion "
            f"(coupling WidthFusion) of the same width; this DiT has "
            f"{None if target is None else tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(emb.to(target))
    return transformer
