"""4Real-Video-V2's feed-forward Gaussian reconstructor (section 3.2): VGGT with temporal
attention and camera-token replacement (:mod:`fourdgen.backbones.vggt`) plus a Gaussian head, a
DPT head with the depth head's hyper-parameters whose 14 output channels refine pixel-aligned
Gaussians placed on VGGT's unprojected depth (:mod:`fourdgen.gaussians.pixel_aligned`)."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from fourdgen.backbones.vggt import VGGT
from fourdgen.backbones.vggt_checkpoint import load_official, read_state_dict
from fourdgen.gaussians.container import Gaussians
from fourdgen.gaussians.pixel_aligned import GAUSSIAN_CHANNELS, pixel_gaussians, to_gaussians
from fourdgen.nn.dpt import DPTHead


@dataclass
class ReconPrediction:
    """Output for a grid ``[B, V, T]`` of ``H x W`` frames, in the frame of the first camera.

    K ``[B, V, T, 3, 3]``, w2c ``[B, V, T, 4, 4]`` (equal over T with camera-token replacement);
    depth, depth_conf ``[B, V, T, H, W]``; gaussians: per timestep, the V * H * W pixel Gaussians of
    all views, ``means [B, T, N, 3]``, ``log_scales [B, T, N, 3]``, ``quats [B, T, N, 4]``,
    ``opacity_logits [B, T, N]``, ``sh0 [B, T, N, 1, 3]``.
    """

    K: Tensor
    w2c: Tensor
    depth: Tensor
    depth_conf: Tensor
    gaussians: dict[str, Tensor]

    def at(self, b: int, t: int) -> Gaussians:
        """The Gaussians of clip ``b`` at timestep ``t``."""
        return to_gaussians({k: v[b, t] for k, v in self.gaussians.items()})


class GaussianReconstructor(nn.Module):
    """``forward(images [B, V, T, 3, H, W] in [0, 1]) -> ReconPrediction``.

    Args:
        preset: VGGT size (``"1b"``, ``"tiny"``) or a :class:`~fourdgen.backbones.vggt.VGGTConfig`.
        temporal: add the zero-initialised temporal attention blocks.
        camera_token_replacement: all timesteps read the first timestep's camera tokens.
        overrides: VGGTConfig fields (e.g. ``img_size``).
    """

    def __init__(
        self, preset="tiny", temporal: bool = True, camera_token_replacement: bool = True, **overrides
    ):
        super().__init__()
        overrides = {"point_head": False, "track_head": False, **overrides}
        self.vggt = VGGT(preset, camera_token_replacement, temporal=temporal, **overrides)
        cfg = self.vggt.config
        if not cfg.camera or not cfg.depth_head:
            raise ValueError("the reconstructor needs VGGT's camera and depth heads")
        self.gaussian_head = DPTHead(
            dim_in=2 * cfg.embed_dim,
            patch_size=cfg.patch_size,
            output_dim=GAUSSIAN_CHANNELS,
            features=cfg.dpt_features,
            out_channels=cfg.dpt_out_channels,
            intermediate_layer_idx=cfg.dpt_layers,
        )
        self._zero_last_conv()

    def _zero_last_conv(self) -> None:
        nn.init.zeros_(self.gaussian_head.last_conv.weight)
        nn.init.zeros_(self.gaussian_head.last_conv.bias)

    def load_vggt(
        self, checkpoint: str | os.PathLike | dict[str, Tensor], head_from_depth: bool = True
    ) -> None:
        """Load official VGGT weights (heads the reconstructor does not use are skipped) and, with
        ``head_from_depth``, start the Gaussian head from the depth head (all but its last layer,
        which stays zero so the initial Gaussians are VGGT's point cloud)."""
        sd = checkpoint if isinstance(checkpoint, dict) else read_state_dict(checkpoint)
        skip = tuple(p for p in ("track_head.", "point_head.") if any(k.startswith(p) for k in sd))
        source = None if isinstance(checkpoint, dict) else str(checkpoint)
        load_official(self.vggt, sd, skip=skip, source=source)
        if head_from_depth:
            self.init_head_from_depth()

    def init_head_from_depth(self) -> None:
        last = {f"scratch.output_conv2.2.{n}" for n in ("weight", "bias")}
        state = {k: v for k, v in self.vggt.depth_head.state_dict().items() if k not in last}
        missing, unexpected = self.gaussian_head.load_state_dict(state, strict=False)
        assert set(missing) == last and not unexpected, (missing, unexpected)
        self._zero_last_conv()

    def _backbone_context(self):
        trains = any(p.requires_grad for p in self.vggt.parameters())
        return nullcontext() if trains and torch.is_grad_enabled() else torch.no_grad()

    def forward(self, images: Tensor) -> ReconPrediction:
        hw = tuple(images.shape[-2:])
        with self._backbone_context():
            out = self.vggt(images)
        raw = self.vggt.dense(self.gaussian_head, out.tokens, hw)  # [B, V, T, 14, H, W]
        params = pixel_gaussians(raw, images, out.depth, out.K, out.w2c)  # [B, V, T, H*W, ...]
        params = {k: rearrange(v, "b v t n ... -> b t (v n) ...") for k, v in params.items()}
        return ReconPrediction(out.K, out.w2c, out.depth, out.depth_conf, params)

    @torch.no_grad()
    def target_cameras(self, reference: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Cameras of ``targets [B, Vt, 3, H, W]`` predicted together with the first input frame
        ``reference [B, 3, H, W]``, in its frame (the frame of the Gaussians): ``K [B, Vt, 3, 3]``,
        ``w2c [B, Vt, 4, 4]``."""
        images = torch.cat([reference[:, None], targets], dim=1)[:, :, None]
        tokens = self.vggt.aggregator(images, keep={self.vggt.config.depth - 1})
        _, K, w2c = self.vggt.cameras(tokens, tuple(images.shape[-2:]))
        return K[:, 1:, 0], w2c[:, 1:, 0]


def shard_reconstructor(
    model: GaussianReconstructor,
    mesh,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
) -> GaussianReconstructor:
    """FSDP2 (``fully_shard``) one unit per transformer block (DINOv2, frame, global, temporal,
    camera trunk), then each head, the aggregator (tokens, patch and position embeddings) and the
    root. Every module the reconstructor enters by ``__call__`` (aggregator, heads) is a unit, so
    their all-gather hooks fire also from :meth:`GaussianReconstructor.target_cameras`.
    ``mesh``: a 1-D data-parallel DeviceMesh; ``param_dtype``: compute dtype (None: as stored)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    vggt = model.vggt
    agg = vggt.aggregator
    blocks = [*agg.patch_embed.blocks, *agg.frame_blocks, *agg.global_blocks]
    blocks += list(agg.temporal_blocks or [])
    heads = [vggt.camera_head, vggt.depth_head, vggt.point_head, vggt.track_head, model.gaussian_head]
    if vggt.camera_head is not None:
        blocks += list(vggt.camera_head.trunk)
    for module in [*blocks, *(h for h in heads if h is not None), agg, model]:
        fully_shard(module, mesh=mesh, mp_policy=mp)
    return model
