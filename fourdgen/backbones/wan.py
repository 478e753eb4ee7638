"""Wan video DiT and VAE (diffusers ``WanTransformer3DModel`` / ``AutoencoderKLWan``).

Two ways to get a model, both returning the stock diffusers classes:
- ``path``: a local diffusers-format checkpoint (``transformer/`` and ``vae/`` sub-folders, e.g.
  Wan2.1-I2V-14B-480P-Diffusers, Wan2.1-Fun-V1.1-14B-InP, Wan2.2-TI2V-5B-Diffusers). Nothing is
  downloaded: loading is ``local_files_only``.
- ``preset``: random weights in a named size. Large presets are built on the meta device (no
  memory) so FSDP can shard them in ``configure_model``; :func:`materialize` then allocates and
  initialises them, including the RoPE tables that ``to_empty`` leaves as garbage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from torch import nn

# Public Wan configurations (diffusers config.json of each release); "tiny" is for CPU tests.
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
    ),
    "1.3b": dict(
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
    ),
    "14b": dict(
        num_attention_heads=40,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=13824,
        num_layers=40,
    ),
    # Wan2.1 I2V / Fun-InP: 36 input channels (noisy 16 + mask 4 + condition 16) and CLIP image tokens.
    "14b-i2v": dict(
        num_attention_heads=40,
        attention_head_dim=128,
        in_channels=36,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=13824,
        num_layers=40,
        image_dim=1280,
        added_kv_proj_dim=5120,
    ),
    # Wan2.2-TI2V-5B: 48-channel latents of the Wan2.2 VAE.
    "5b": dict(
        num_attention_heads=24,
        attention_head_dim=128,
        in_channels=48,
        out_channels=48,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=14336,
        num_layers=30,
    ),
}
_COMMON = dict(
    patch_size=(1, 2, 2),
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

VAE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[True]
    ),
    "wan2.1": {},  # diffusers' defaults are the Wan2.1 VAE
    # Wan2.2 VAE architecture. Its latent mean/std are per-release statistics that come with the
    # checkpoint's config.json; a random-weight preset has none, so they are 0/1 here.
    "wan2.2": dict(
        base_dim=160,
        decoder_base_dim=256,
        z_dim=48,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=[0.0] * 48,
        latents_std=[1.0] * 48,
    ),
}
DEFAULT_VAE = {"tiny": "tiny", "1.3b": "wan2.1", "14b": "wan2.1", "14b-i2v": "wan2.1", "5b": "wan2.2"}
META_BY_DEFAULT = {"1.3b", "14b", "14b-i2v", "5b"}


def _local_dir(path: str | Path, subfolder: str, what: str) -> Path:
    root = Path(path)
    folder = root / subfolder if subfolder else root
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{what}: no config.json in {folder} (expected a local diffusers-format "
            f"checkpoint with a '{subfolder}' sub-folder; nothing is downloaded)"
        )
    return root


def _from_pretrained(cls, root: Path, subfolder: str, dtype: torch.dtype):
    """``cls.from_pretrained`` of a local folder, every weight accounted for. diffusers fills weights
    the checkpoint lacks with random ones (and drops those the model has no place for) with only a
    log line: a renamed or missing key would train on noise. Here each is one
    :class:`~fourdgen.errors.FileFormatError` naming the folder and the key, as are unreadable files
    and shape mismatches (diffusers' own ``OSError``/``ValueError``)."""
    from fourdgen.errors import FileFormatError, short_error

    folder = root / subfolder if subfolder else root
    what = f"a diffusers {cls.__name__} checkpoint"
    try:
        model, info = cls.from_pretrained(
            root,
            subfolder=subfolder or None,
            torch_dtype=dtype,
            local_files_only=True,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError, TypeError) as e:  # unreadable file, shape mismatch, bad config
        raise FileFormatError(folder, "<weights>", what, short_error(e)) from None
    for kind, expected in (
        ("missing_keys", "a tensor of the checkpoint (the model has this weight)"),
        ("unexpected_keys", "only weights the model has (the checkpoint is of another architecture?)"),
        ("mismatched_keys", "the model's shape"),
    ):
        keys = info.get(kind) or []
        if keys:
            key = keys[0][0] if isinstance(keys[0], tuple) else keys[0]
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise FileFormatError(folder, str(key), expected, kind.replace("_keys", "") + more)
    return model


def cast_as_loaded(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The dtypes ``from_pretrained(torch_dtype=dtype)`` gives a diffusers model: its state-dict tensors
    in ``dtype``, except those of ``_keep_in_fp32_modules`` (float32: Wan's rope, time embedder,
    modulation tables, norms); non-persistent buffers as built. A meta-device copy must match the
    loaded one dtype for dtype: FSDP2 gathers each parameter's shards from every rank."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    names = set(model.state_dict())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in names and t.is_floating_point():
            t.data = t.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model


def build_transformer(
    path: str | None = None,
    preset: str | None = "tiny",
    subfolder: str = "transformer",
    overrides: dict[str, Any] | None = None,
    meta: bool | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> WanTransformer3DModel:
    """A Wan DiT from a local checkpoint (``path``) or a preset with random weights.

    ``meta`` (default: True for presets larger than tiny, False for a checkpoint) builds on the
    meta device; call :func:`materialize` (e.g. in ``configure_model``) before use. A checkpoint
    built on the meta device reads only its ``config.json`` (the architecture, for an adapter export).
    """
    if path is not None:
        root = _local_dir(path, subfolder, "build_transformer")
        if meta:
            with torch.device("meta"):
                cfg = WanTransformer3DModel.load_config(root / subfolder if subfolder else root)
                return cast_as_loaded(WanTransformer3DModel.from_config(cfg), dtype)
        return _from_pretrained(WanTransformer3DModel, root, subfolder, dtype)
    if preset not in TRANSFORMER_PRESETS:
        raise ValueError(
            f"build_transformer: preset must be one of {sorted(TRANSFORMER_PRESETS)}, got {preset!r}"
        )
    cfg = {**_COMMON, **TRANSFORMER_PRESETS[preset], **(overrides or {})}
    meta = preset in META_BY_DEFAULT if meta is None else meta
    with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**cfg)
    return model if meta else model.to(dtype)


def build_vae(
    path: str | None = None,
    preset: str | None = "tiny",
    subfolder: str = "vae",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> AutoencoderKLWan:
    """The Wan VAE from a local checkpoint or a preset (random weights drawn with ``seed``, on CPU,
    so the DataModule's latent cache and the model build the same VAE)."""
    if path is not None:
        root = _local_dir(path, subfolder, "build_vae")
        return _from_pretrained(AutoencoderKLWan, root, subfolder, dtype)
    if preset not in VAE_PRESETS:
        raise ValueError(f"build_vae: preset must be one of {sorted(VAE_PRESETS)}, got {preset!r}")
    # On CPU explicitly: Lightning calls configure_model under `with <cuda device>`, where the
    # initialisers would draw from the CUDA generator and give other weights than the DataModule's.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        return AutoencoderKLWan(**VAE_PRESETS[preset]).to(dtype)


@torch.no_grad()
def materialize(
    model: nn.Module, device: torch.device | str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> nn.Module:
    """Allocate a meta-device model on ``device`` and initialise it as its constructors would.

    Parameters: each submodule's ``reset_parameters`` (Linear, Conv, norms, Embedding), and the
    modulation tables ``scale_shift_table`` as diffusers draws them (``randn / sqrt(dim)``).
    Non-persistent RoPE buffers are rebuilt exactly (``to_empty`` leaves them uninitialised).
    """
    torch.manual_seed(seed)
    model.to_empty(device=device)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
        table = getattr(m, "scale_shift_table", None)
        if isinstance(table, nn.Parameter):
            table.copy_(torch.randn_like(table) / table.shape[-1] ** 0.5)
    for m in model.modules():
        if isinstance(m, WanRotaryPosEmbed):
            fresh = WanRotaryPosEmbed(m.attention_head_dim, m.patch_size, m.max_seq_len)
            m.freqs_cos = fresh.freqs_cos.to(device)
            m.freqs_sin = fresh.freqs_sin.to(device)
    model.to(dtype)
    return model


def shard_transformer(
    model: WanTransformer3DModel,
    mesh,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype | None = torch.float32,
) -> WanTransformer3DModel:
    """FSDP2 (``fully_shard``) each DiT block, then the root (embeddings, head, new tensors).

    One block per FSDP unit: its parameters are all-gathered just before it runs and freed after,
    so peak memory is one block's full weights on top of the shards. Frozen base weights and float32
    trainable ones (LoRA, domain embeddings) may share a unit: FSDP2 requires a uniform dtype among
    the trainable parameters only, and all-gathers everything in ``param_dtype``. Gradients of the
    trainable parameters are reduced in ``reduce_dtype``. ``mesh``: a 1-D data-parallel DeviceMesh.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def load_shards_from_rank0(model: nn.Module, full_state: dict, device: torch.device | str) -> nn.Module:
    """After :func:`shard_transformer`: each rank's shards from rank 0's whole model (``full_state``,
    its state dict from before sharding; ``{}`` on the other ranks, which built theirs on the meta
    device). Their shards are allocated here, then filled by torch's ``set_model_state_dict``
    (``broadcast_from_rank0``: one tensor at a time, each rank keeps its shard). Buffers are not
    sharded, and the non-persistent ones (RoPE tables) are in no state dict: broadcast as they are."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dist.get_rank() != 0:
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model
