"""VGGT (Wang et al., CVPR 2025) with 4Real-Video-V2's dynamic extensions.

The aggregator embeds every frame with DINOv2 (timm's ViT with registers), prepends a camera token
and register tokens per frame, and alternates frame-wise and global attention blocks. Heads read
its layer outputs: an iterative camera head (pose encoding -> ``K``, ``w2c``), DPT heads for
depth / world points and the point-track head (:mod:`fourdgen.backbones.vggt_track`).

Input here is a grid ``[B, V, T, 3, H, W]`` (views x timesteps, RGB in [0, 1]). Global attention
spans the V views of one timestep, exactly VGGT on that timestep; ``T = 1`` is the official model.
4Real-Video-V2 (section 3.2) adds, behind ``temporal=True``:

- a temporal attention block after every frame and global block, attending across the T timesteps
  of each token (same view, same patch), with zero-initialised outputs so that at init the model
  is VGGT (rows use RoPE over the timestep index);
- camera-token replacement (``camera_token_replacement``): after the blocks, every view at every
  timestep reads the camera tokens of the first timestep, so all timesteps share one camera set.

Cameras come out in the frame of the first view (a trained model gives it the identity ``w2c``),
following
:mod:`fourdgen.geometry.cameras`. VGGT unprojects pixel (i, j) at (i, j) with the principal
point at (W/2, H/2); with fourdgen's pixel-centre convention that principal point is
(W/2 + 0.5, H/2 + 0.5), which
:func:`~fourdgen.geometry.cameras.vggt_pose_encoding_to_cameras` returns.

Official checkpoints load through :mod:`fourdgen.backbones.vggt_checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial

import torch
from einops import rearrange
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fourdgen.geometry.cameras import vggt_pose_encoding_to_cameras
from fourdgen.nn.dpt import DPTHead
from fourdgen.nn.vit import Block, RotaryPositionEmbedding2D, grid_positions

_RESNET_MEAN = (0.485, 0.456, 0.406)
_RESNET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VGGTConfig:
    """Sizes of a VGGT model. ``PRESETS["1b"]`` is the official VGGT-1B."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24  # frame/global block pairs
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    dino_depth: int = 24
    dino_heads: int = 16
    rope_freq: float = 100.0
    init_values: float = 0.01
    camera_trunk_depth: int = 4
    dpt_features: int = 256
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    dpt_layers: tuple[int, int, int, int] = (4, 11, 17, 23)
    camera: bool = True
    depth_head: bool = True
    point_head: bool = True
    track_head: bool = False
    temporal: bool = False


PRESETS: dict[str, VGGTConfig] = {
    "1b": VGGTConfig(track_head=True),
    "tiny": VGGTConfig(
        img_size=56,
        embed_dim=32,
        depth=4,
        num_heads=2,
        dino_depth=2,
        dino_heads=2,
        camera_trunk_depth=1,
        dpt_features=16,
        dpt_out_channels=(8, 16, 32, 32),
        dpt_layers=(1, 2, 2, 3),  # like 1b's, skips layer 0: unused layers are None
    ),
}


def make_config(preset: str | VGGTConfig = "1b", **overrides) -> VGGTConfig:
    if isinstance(preset, VGGTConfig):
        return replace(preset, **overrides)
    if preset not in PRESETS:
        raise ValueError(f"VGGT preset {preset!r}: expected one of {sorted(PRESETS)}")
    return replace(PRESETS[preset], **overrides)


# ------------------------------------------------------------------------------------ aggregator
def _at_least_fp32(x: Tensor) -> Tensor:
    """Head outputs in float32, or float64 when the model runs in float64 (never down-cast)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _expand_special(token: Tensor, groups: int, frames: int) -> Tensor:
    """``token [1, 2, X, C]`` -> ``[groups * frames, X, C]``: variant 0 for the first frame of each
    group, variant 1 for the others."""
    first = token[:, :1].expand(groups, 1, *token.shape[2:])
    rest = token[:, 1:].expand(groups, frames - 1, *token.shape[2:])
    return torch.cat([first, rest], dim=1).flatten(0, 1)


class Aggregator(nn.Module):
    """DINOv2 patch embedding + alternating frame / global (+ temporal) attention.

    ``forward(images [B, V, T, 3, H, W] in [0, 1], keep: set[int])`` -> list of ``depth`` entries,
    ``[B, T, V, P, 2 * embed_dim]`` (frame and global block outputs concatenated) for the layer
    indices in ``keep`` and None elsewhere (heads need four or five of 24; keeping all costs GBs).
    """

    def __init__(self, cfg: VGGTConfig):
        super().__init__()
        C = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.patch_start_idx = 1 + cfg.num_register_tokens
        # DINOv2-reg: timm's ViT computes it exactly (bicubic antialiased position resampling).
        # Its class token carries the checkpoint's class position embedding (no_embed_class).
        self.patch_embed = VisionTransformer(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            embed_dim=C,
            depth=cfg.dino_depth,
            num_heads=cfg.dino_heads,
            mlp_ratio=4.0,
            init_values=1.0,
            reg_tokens=cfg.num_register_tokens,
            no_embed_class=True,
            dynamic_img_size=True,
            num_classes=0,
            global_pool="",
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        # DINOv2's masked-modelling token: in the checkpoint, unused at inference; kept so that
        # official_state_dict round-trips.
        self.register_buffer("dino_mask_token", torch.zeros(1, C))
        self.rope = RotaryPositionEmbedding2D(cfg.rope_freq) if cfg.rope_freq > 0 else None
        block = partial(
            Block,
            dim=C,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            init_values=cfg.init_values,
            qk_norm=True,
            rope=self.rope,
        )
        self.frame_blocks = nn.ModuleList([block() for _ in range(cfg.depth)])
        self.global_blocks = nn.ModuleList([block() for _ in range(cfg.depth)])
        self.temporal_blocks = None
        if cfg.temporal:  # one after each frame block and each global block
            self.temporal_blocks = nn.ModuleList([block() for _ in range(2 * cfg.depth)])
            for b in self.temporal_blocks:
                b.zero_init_output()
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, C) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, cfg.num_register_tokens, C) * 1e-6)
        self.register_buffer("_mean", torch.tensor(_RESNET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(_RESNET_STD).view(1, 3, 1, 1), persistent=False)
        self.gradient_checkpointing = False

    def _run(self, blk: nn.Module, x: Tensor, pos: Tensor | None) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, pos, use_reentrant=False)
        return blk(x, pos)

    def forward(self, images: Tensor, keep: set[int] | None = None) -> list[Tensor | None]:
        B, V, T, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"images are {H}x{W}; VGGT needs height and width divisible by {p}")
        x = rearrange(images, "b v t c h w -> (b t v) c h w")
        x = (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)
        patches = self.patch_embed.forward_features(x)[:, self.patch_embed.num_prefix_tokens :]
        special = [
            _expand_special(tok, B * T, V).to(patches.dtype)
            for tok in (self.camera_token, self.register_token)
        ]
        x = torch.cat([*special, patches], dim=1)  # [(b t v), P, C]
        P = x.shape[1]
        pos = grid_positions(H // p, W // p, device=x.device) + 1  # special tokens sit at (0, 0)
        pos = torch.cat([pos.new_zeros(self.patch_start_idx, 2), pos])[None]
        frame_pos, global_pos = pos.expand(B * T * V, P, 2), pos.repeat(1, V, 1).expand(B * T, V * P, 2)
        tpos = torch.stack(
            [torch.arange(T, device=x.device), torch.zeros(T, dtype=torch.long, device=x.device)], -1
        )
        tpos = tpos[None].expand(B * V * P, T, 2)
        keep = set(range(len(self.frame_blocks))) if keep is None else keep
        outputs: list[Tensor | None] = []
        for i, (fblk, gblk) in enumerate(zip(self.frame_blocks, self.global_blocks, strict=True)):
            x = self._run(fblk, x, frame_pos)
            x = self._temporal(2 * i, x, B, T, V, tpos)
            frame_out = x
            x = self._run(gblk, rearrange(x, "(bt v) p c -> bt (v p) c", v=V), global_pos)
            x = rearrange(x, "bt (v p) c -> (bt v) p c", v=V)
            x = self._temporal(2 * i + 1, x, B, T, V, tpos)
            if i in keep:
                out = torch.cat([frame_out, x], dim=-1)
                outputs.append(rearrange(out, "(b t v) p c -> b t v p c", b=B, t=T))
            else:
                outputs.append(None)
        return outputs

    def _temporal(self, j: int, x: Tensor, B: int, T: int, V: int, tpos: Tensor) -> Tensor:
        if self.temporal_blocks is None:
            return x
        y = rearrange(x, "(b t v) p c -> (b v p) t c", b=B, t=T)
        y = self._run(self.temporal_blocks[j], y, tpos)
        return rearrange(y, "(b v p) t c -> (b t v) p c", b=B, v=V)


# ----------------------------------------------------------------------------------- camera head
class CameraHead(nn.Module):
    """VGGT's camera head: the camera token of the last layer, refined over ``iterations`` by an
    adaLN-modulated transformer trunk that attends across the frames of one group.

    ``forward(cam_tokens [G, S, 2C]) -> list of pose encodings [G, S, 9]`` (one per iteration).
    """

    def __init__(self, dim_in: int, trunk_depth: int = 4, num_heads: int = 16, init_values: float = 0.01):
        super().__init__()
        self.trunk = nn.Sequential(
            *[Block(dim_in, num_heads, 4.0, init_values=init_values) for _ in range(trunk_depth)]
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, 9))
        self.embed_pose = nn.Linear(9, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, 9)

    def forward(self, cam_tokens: Tensor, iterations: int = 4) -> list[Tensor]:
        tokens = self.token_norm(cam_tokens)
        enc, out = None, []
        for _ in range(iterations):
            cond = self.empty_pose_tokens.expand(*tokens.shape[:2], 9) if enc is None else enc.detach()
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(cond)).chunk(3, dim=-1)
            h = tokens + gate * (self.adaln_norm(tokens) * (1 + scale) + shift)
            delta = self.pose_branch(self.trunk_norm(self.trunk(h)))
            enc = delta if enc is None else enc + delta
            # translation and quaternion are linear; the two fields of view pass a ReLU
            out.append(torch.cat([enc[..., :7], enc[..., 7:].relu()], dim=-1))
        return out


# ----------------------------------------------------------------------------------------- model
@dataclass
class VGGTOutput:
    """Predictions for a grid ``[B, V, T]`` of ``H x W`` frames (cameras shared over T when the
    camera tokens are replaced).

    pose_enc ``[B, V, T, 9]``; K ``[B, V, T, 3, 3]``; w2c ``[B, V, T, 4, 4]``;
    depth ``[B, V, T, H, W]``, depth_conf ``[B, V, T, H, W]``; world_points ``[B, V, T, H, W, 3]``
    and world_points_conf ``[B, V, T, H, W]`` when the point head exists;
    tokens: the aggregator's kept layer outputs ``[B, T, V, P, 2C]`` (others None).
    """

    pose_enc: Tensor | None = None
    K: Tensor | None = None
    w2c: Tensor | None = None
    depth: Tensor | None = None
    depth_conf: Tensor | None = None
    world_points: Tensor | None = None
    world_points_conf: Tensor | None = None
    tokens: list[Tensor | None] = field(default_factory=list)


class VGGT(nn.Module):
    """VGGT backbone + heads. ``forward(images [B, V, T, 3, H, W] in [0, 1]) -> VGGTOutput``;
    :meth:`forward_official` takes ``[B, S, 3, H, W]`` and returns the official output dict."""

    def __init__(self, config: VGGTConfig | str = "1b", camera_token_replacement: bool = True, **overrides):
        super().__init__()
        cfg = make_config(config, **overrides)
        self.config = cfg
        self.camera_token_replacement = camera_token_replacement
        self.aggregator = Aggregator(cfg)
        dim = 2 * cfg.embed_dim
        dpt = partial(
            DPTHead,
            dim_in=dim,
            patch_size=cfg.patch_size,
            features=cfg.dpt_features,
            out_channels=cfg.dpt_out_channels,
            intermediate_layer_idx=cfg.dpt_layers,
        )
        self.camera_head = (
            CameraHead(dim, cfg.camera_trunk_depth, cfg.num_heads, cfg.init_values) if cfg.camera else None
        )
        self.depth_head = dpt(output_dim=2) if cfg.depth_head else None
        self.point_head = dpt(output_dim=4) if cfg.point_head else None
        self.track_head = None
        if cfg.track_head:
            from fourdgen.backbones.vggt_track import TrackHead

            self.track_head = TrackHead(dim, patch_size=cfg.patch_size)

    @property
    def patch_start_idx(self) -> int:
        return self.aggregator.patch_start_idx

    def layers_needed(self, extra: tuple[int, ...] = ()) -> set[int]:
        keep = set(extra)
        if self.camera_head is not None:
            keep.add(self.config.depth - 1)
        if self.depth_head is not None or self.point_head is not None:
            keep.update(self.config.dpt_layers)
        if self.track_head is not None:
            keep.update(self.track_head.feature_extractor.intermediate_layer_idx)
        return keep

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks: DINOv2's, then the frame, global and temporal ones."""
        agg = self.aggregator
        return [*agg.patch_embed.blocks, *agg.frame_blocks, *agg.global_blocks, *(agg.temporal_blocks or [])]

    def compile_blocks(self, **compile_kwargs) -> None:
        """``torch.compile`` every transformer block in place (regional compilation: one graph per
        block shape, shared by all blocks, since parameters are graph inputs). Eager, a block's
        norms, q/k norms, 2-D RoPE, casts and layer scales are tens of memory-bound kernels over
        the whole token grid around its matmuls and attention (issue 21, P4); compiled, a few fused
        ones. ``compile_kwargs`` go to :meth:`torch.nn.Module.compile` (default ``dynamic=False``:
        frame, global and temporal blocks see three fixed shapes per grid, each its own graph)."""
        compile_kwargs.setdefault("dynamic", False)
        for blk in self.blocks():
            blk.compile(**compile_kwargs)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.aggregator.gradient_checkpointing = enabled
        self.aggregator.patch_embed.set_grad_checkpointing(enabled)

    def cameras(
        self, tokens: list[Tensor | None], image_hw: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> pose_enc ``[B, V, T, 9]``, K, w2c from the last layer's camera tokens. With camera-token
        replacement every timestep reads the camera tokens of timestep 0, so the head runs once on
        those and its output is shared (the same result as replacing the tokens, T times cheaper)."""
        last = tokens[self.config.depth - 1]
        B, T = last.shape[:2]
        cam = last[:, :, :, 0]  # [B, T, V, 2C]
        if self.camera_token_replacement:
            cam = cam[:, :1]
        # Autocast off and the head's own weight dtype, like the reference: fp32 under bf16 autocast
        # (4 refinement passes over a handful of tokens cost nothing, and bf16 visibly perturbs the
        # rotations), float64 in a float64 model (the official code runs there too).
        head_dtype = next(self.camera_head.parameters()).dtype
        with torch.autocast(cam.device.type, enabled=False):
            enc = self.camera_head(rearrange(cam.to(head_dtype), "b t v c -> (b t) v c"))[-1]
        enc = rearrange(_at_least_fp32(enc), "(b t) v k -> b v t k", b=B).expand(-1, -1, T, -1)
        K, w2c = vggt_pose_encoding_to_cameras(enc, image_hw)
        return enc, K, w2c

    def dense(self, head: DPTHead, tokens: list[Tensor | None], image_hw: tuple[int, int]) -> Tensor:
        """Run a DPT head over all frames -> ``[B, V, T, C, H, W]`` raw outputs."""
        B, T, V = next(t for t in tokens if t is not None).shape[:3]
        flat = [None if t is None else rearrange(t, "b t v p c -> (b v t) p c") for t in tokens]
        out = head(flat, image_hw, self.patch_start_idx)
        return rearrange(out, "(b v t) c h w -> b v t c h w", b=B, v=V)

    def forward(self, images: Tensor, keep_layers: tuple[int, ...] = ()) -> VGGTOutput:
        if images.dim() != 6 or images.shape[3] != 3:
            raise ValueError(f"VGGT expects images [B, V, T, 3, H, W]; got {tuple(images.shape)}")
        hw = tuple(images.shape[-2:])
        tokens = self.aggregator(images, self.layers_needed(keep_layers))
        out = VGGTOutput(tokens=tokens)
        if self.camera_head is not None:
            out.pose_enc, out.K, out.w2c = self.cameras(tokens, hw)
        if self.depth_head is not None:
            raw = _at_least_fp32(self.dense(self.depth_head, tokens, hw))
            out.depth, out.depth_conf = raw[:, :, :, 0].exp(), 1 + raw[:, :, :, 1].exp()
        if self.point_head is not None:
            raw = _at_least_fp32(self.dense(self.point_head, tokens, hw))
            xyz = raw[:, :, :, :3]
            out.world_points = (xyz.sign() * xyz.abs().expm1()).permute(0, 1, 2, 4, 5, 3)
            out.world_points_conf = 1 + raw[:, :, :, 3].exp()
        return out

    def forward_official(self, images: Tensor, query_points: Tensor | None = None) -> dict[str, Tensor]:
        """The official ``VGGT.forward``: ``images [B, S, 3, H, W]`` (or ``[S, 3, H, W]``) -> dict
        with ``pose_enc [B, S, 9]``, ``depth [B, S, H, W, 1]``, ``depth_conf``, ``world_points
        [B, S, H, W, 3]``, ``world_points_conf`` (and ``track``, ``vis``, ``conf``)."""
        if images.dim() == 4:
            images = images[None]
        out = self(images[:, :, None])
        pred = {}
        if out.pose_enc is not None:
            pred["pose_enc"] = out.pose_enc[:, :, 0]
        if out.depth is not None:
            pred["depth"], pred["depth_conf"] = out.depth[:, :, 0, ..., None], out.depth_conf[:, :, 0]
        if out.world_points is not None:
            pred["world_points"], pred["world_points_conf"] = (
                out.world_points[:, :, 0],
                out.world_points_conf[:, :, 0],
            )
        if self.track_head is not None and query_points is not None:
            if query_points.dim() == 2:
                query_points = query_points[None]
            tokens = [None if t is None else t[:, 0] for t in out.tokens]  # [B, S, P, C]
            tracks, vis, conf = self.track_head(
                tokens, tuple(images.shape[-2:]), self.patch_start_idx, query_points
            )
            pred["track"], pred["vis"], pred["conf"] = tracks[-1], vis, conf
        return pred
