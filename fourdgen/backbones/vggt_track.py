"""VGGT point-tracking head (Wang et al. 2025), re-implemented from the paper's released architecture.

A DPT feature extractor turns the aggregator's layer tokens into half-resolution feature maps; a
CoTracker/VGGSfM-style predictor then refines tracks iteratively: each step samples a local
correlation window around every current position at several pyramid levels, embeds it with the
track's displacement from its query, and lets a transformer (attention over time, and over points
through a few learned "virtual tracks") predict coordinate and feature updates.

Parameter names (and the ``virual_tracks`` typo) follow the official layout, so the ``track_head.*``
entries of the VGGT-1B checkpoint load with ``strict=True`` once the prefix is stripped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from timm.layers import Mlp
from torch import Tensor, nn

from fourdgen.nn.dpt import DPTHead, sincos_embed

MAX_SCALE = 518.0  # raw displacements enter the transformer divided by this (VGGT's image size)


def _grid_sample(x: Tensor, xy: Tensor, padding_mode: str) -> Tensor:
    """Bilinear lookup of ``x [B, C, H, W]`` at pixel positions ``xy [B, h, w, 2]`` (x, y; pixel
    centres at integers, i.e. ``align_corners=True``) -> ``[B, C, h, w]``. Sample positions carry no
    gradient, as in the reference."""
    H, W = x.shape[-2:]
    scale = torch.tensor([2 / max(W - 1, 1), 2 / max(H - 1, 1)], device=x.device, dtype=x.dtype)
    grid = xy.detach().to(x.dtype) * scale - 1
    return F.grid_sample(x, grid, align_corners=True, padding_mode=padding_mode)


def sample_points(fmap: Tensor, xy: Tensor) -> Tensor:
    """``fmap [B, C, H, W]`` at ``xy [B, N, 2]`` pixels (border padding) -> ``[B, N, C]``."""
    return rearrange(_grid_sample(fmap, xy[:, :, None], "border"), "b c n 1 -> b n c")


def flow_embedding(flows: Tensor, dim: int) -> Tensor:
    """``flows [..., 2]`` -> ``[..., 2 * dim]``: per axis (x then y) interleaved sin/cos at the
    linearly spaced frequencies ``k * 1000 / dim`` (k = 0, 2, 4, ...) the reference uses."""
    freqs = torch.arange(0, dim, 2, device=flows.device, dtype=torch.float32) * (1000.0 / dim)
    ang = flows.float()[..., None] * freqs  # [..., 2, dim/2]
    return rearrange(torch.stack([ang.sin(), ang.cos()], -1), "... a f t -> ... (a f t)")


def grid_sincos(dim: int, height: int, width: int, device=None) -> Tensor:
    """``[dim, height, width]`` fixed 2-D sin-cos embedding of integer pixel positions: the x
    embedding fills the first ``dim/2`` channels, y the rest (base 10000, computed in float64)."""
    yy, xx = torch.meshgrid(
        torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
    )
    emb = torch.cat([sincos_embed(xx, dim // 2, 10000.0), sincos_embed(yy, dim // 2, 10000.0)], -1)
    return emb.permute(2, 0, 1)


def corr_pyramid(fmaps: Tensor, levels: int) -> list[Tensor]:
    """``fmaps [B, S, C, H, W]`` and ``levels - 1`` successive 2x average-pooled copies."""
    pyramid = [fmaps]
    for _ in range(levels - 1):
        b = fmaps.shape[0]
        fmaps = rearrange(F.avg_pool2d(fmaps.flatten(0, 1), 2, 2), "(b s) c h w -> b s c h w", b=b)
        pyramid.append(fmaps)
    return pyramid


def sample_correlation(pyramid: list[Tensor], feats: Tensor, coords: Tensor, radius: int) -> Tensor:
    """Local correlation windows.

    ``feats [B, S, N, C]`` track features, ``coords [B, S, N, 2]`` positions at level-0 pixels ->
    ``[B, S, N, levels * (2r+1)^2]``: at each level, the scaled dot products of each track feature
    with that frame's feature map, bilinearly read on a ``(2r+1)^2`` window around the position
    (zero outside; the window's first axis steps x, the second y). Each level's full correlation
    volume ``[B, S, N, h, w]`` is built and discarded in turn.
    """
    B, S, N, C = feats.shape
    d = torch.arange(-radius, radius + 1, device=coords.device, dtype=coords.dtype)
    window = torch.cartesian_prod(d, d).view(1, 2 * radius + 1, 2 * radius + 1, 2)
    out = []
    for level, fmaps in enumerate(pyramid):
        h, w = fmaps.shape[-2:]
        corr = feats @ fmaps.flatten(-2) / math.sqrt(C)  # [B, S, N, h*w]
        corr = corr.view(B * S * N, 1, h, w)
        centre = coords.reshape(B * S * N, 1, 1, 2) / 2**level
        out.append(_grid_sample(corr, centre + window, "zeros").view(B, S, N, -1))
    return torch.cat(out, -1)


class AttnBlock(nn.Module):
    """``x = norm1(x); x + attn(x) ; x + mlp(norm2(x))`` (the residual starts from the normalised
    input, as in the reference). ``[B, L, C] -> [B, L, C]``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """:class:`AttnBlock` with queries from ``x [B, L, C]`` and keys/values from ``context
    [B, M, C]`` (normalised by ``norm_context``) -> ``[B, L, C]``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.cross_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x, context = self.norm1(x), self.norm_context(context)
        x = x + self.cross_attn(x, context, context, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class EfficientUpdateFormer(nn.Module):
    """Track-update transformer: ``[B, N, S, input_dim] -> [B, N, S, output_dim]``.

    Each of ``depth`` rounds attends over time within every track, then over space through
    ``num_virtual_tracks`` learned tokens (virtual <- points, virtual self-attention, points <-
    virtual), which keeps the cost linear in the number of tracks. The output is read from the
    hidden state plus its input projection.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden_size: int = 384,
        depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        num_virtual_tracks: int = 64,
    ):
        super().__init__()
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim)
        self.virual_tracks = nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size))

        def blocks(cls):
            return nn.ModuleList([cls(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])

        self.time_blocks = blocks(AttnBlock)
        self.space_virtual_blocks = blocks(AttnBlock)
        self.space_point2virtual_blocks = blocks(CrossAttnBlock)
        self.space_virtual2point_blocks = blocks(CrossAttnBlock)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.flow_head.weight, std=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        B, N, S, _ = x.shape
        x0 = x = self.input_transform(self.input_norm(x))
        x = torch.cat([x, self.virual_tracks.expand(B, -1, S, -1)], dim=1)
        for time, v2p, virtual, p2v in zip(
            self.time_blocks,
            self.space_virtual2point_blocks,
            self.space_virtual_blocks,
            self.space_point2virtual_blocks,
            strict=True,
        ):
            x = time(rearrange(x, "b n s c -> (b n) s c"))
            x = rearrange(x, "(b n) s c -> (b s) n c", b=B)
            points, virt = x[:, :N], x[:, N:]
            virt = virtual(v2p(virt, points))
            points = p2v(points, virt)
            x = rearrange(torch.cat([points, virt], dim=1), "(b s) n c -> b n s c", b=B)
        return self.flow_head(self.output_norm(x[:, :N] + x0))


class TrackPredictor(nn.Module):
    """Iterative track refinement over feature maps (the reference's ``BaseTrackerPredictor``).

    ``forward(query_points [B, N, 2], fmaps [B, S, C, h, w], iters)`` with queries in pixels of
    frame 0 and feature maps ``stride`` times coarser than those pixels -> (``iters`` tracks, each
    ``[B, S, N, 2]`` pixels; visibility ``[B, S, N]``; confidence ``[B, S, N]`` or None), the
    scores in (0, 1). Frame 0 stays pinned at the query.
    """

    def __init__(
        self,
        latent_dim: int = 128,
        hidden_size: int = 384,
        stride: int = 2,
        corr_levels: int = 7,
        corr_radius: int = 4,
        depth: int = 6,
        predict_conf: bool = True,
    ):
        super().__init__()
        self.latent_dim, self.stride = latent_dim, stride
        self.corr_levels, self.corr_radius = corr_levels, corr_radius
        self.transformer_dim = 3 * latent_dim + 4  # flow embedding + 2 x 2 raw flow, correlation, feature
        self.corr_mlp = Mlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden_size, latent_dim)
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, self.transformer_dim))
        self.updateformer = EfficientUpdateFormer(
            self.transformer_dim, latent_dim + 2, hidden_size=hidden_size, depth=depth
        )
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1)) if predict_conf else None

    def forward(self, query_points: Tensor, fmaps: Tensor, iters: int = 4):
        B, S, _, h, w = fmaps.shape
        fmaps = self.fmap_norm(fmaps.movedim(2, -1)).movedim(-1, 2)
        query = query_points / float(self.stride)  # [B, N, 2] feature-map pixels
        coords = repeat(query, "b n t -> b s n t", s=S)
        feats = repeat(sample_points(fmaps[:, 0], query), "b n c -> b s n c", s=S)
        pyramid = corr_pyramid(fmaps, self.corr_levels)
        # constant per track: position of its query, and a token marking frame 0 vs the others
        pos = grid_sincos(self.transformer_dim, h, w, fmaps.device).to(fmaps.dtype)
        pos = sample_points(pos.expand(B, -1, -1, -1), query)  # [B, N, D]
        t0, t1 = self.query_ref_token.unbind(1)
        frame_tok = torch.cat([t0[:, None], t1[:, None].expand(-1, S - 1, -1)], dim=1)  # [1, S, D]

        tracks = []
        for _ in range(iters):
            coords = coords.detach()
            corr = self.corr_mlp(sample_correlation(pyramid, feats, coords, self.corr_radius))
            flows = coords - coords[:, :1]
            flow_emb = flow_embedding(flows, self.latent_dim // 2).to(flows.dtype)
            x = torch.cat([flow_emb, flows / MAX_SCALE, flows / MAX_SCALE, corr, feats], dim=-1)
            x = rearrange(x, "b s n d -> b n s d") + pos[:, :, None]
            delta = rearrange(self.updateformer(x + frame_tok.to(x.dtype)), "b n s d -> b s n d")
            dfeat = self.ffeat_norm(delta[..., 2:].reshape(-1, self.latent_dim))
            feats = self.ffeat_updater(dfeat).view_as(feats) + feats
            coords = coords + delta[..., :2]
            coords = torch.cat([query[:, None], coords[:, 1:]], dim=1)
            tracks.append(coords * self.stride)

        vis = torch.sigmoid(self.vis_predictor(feats).squeeze(-1))
        conf = None if self.conf_predictor is None else torch.sigmoid(self.conf_predictor(feats).squeeze(-1))
        return tracks, vis, conf


class TrackHead(nn.Module):
    """VGGT track head: a feature-only DPT (``features`` channels at half resolution) followed by
    :class:`TrackPredictor`. See :meth:`forward`."""

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        features: int = 128,
        iters: int = 4,
        predict_conf: bool = True,
        stride: int = 2,
        corr_levels: int = 7,
        corr_radius: int = 4,
        hidden_size: int = 384,
    ):
        super().__init__()
        self.patch_size, self.iters = patch_size, iters
        self.feature_extractor = DPTHead(
            dim_in, patch_size=patch_size, features=features, feature_only=True, down_ratio=2, pos_embed=False
        )
        self.tracker = TrackPredictor(
            latent_dim=features,
            hidden_size=hidden_size,
            stride=stride,
            corr_levels=corr_levels,
            corr_radius=corr_radius,
            predict_conf=predict_conf,
        )

    def forward(
        self,
        tokens: list[Tensor],
        image_hw: tuple[int, int],
        patch_start_idx: int,
        query_points: Tensor,
        iters: int | None = None,
    ) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """tokens: list of ``[B, S, P, dim_in]`` layer outputs (None where not needed);
        query_points ``[B, N, 2]`` pixels in frame 0. Returns (tracks per iteration, each
        ``[B, S, N, 2]`` pixels; vis ``[B, S, N]``; conf ``[B, S, N]`` or None)."""
        B = next(t for t in tokens if t is not None).shape[0]
        flat = [None if t is None else t.flatten(0, 1) for t in tokens]  # unused layers may be None
        fmaps = self.feature_extractor(flat, image_hw, patch_start_idx)
        fmaps = rearrange(fmaps, "(b s) c h w -> b s c h w", b=B)
        return self.tracker(query_points, fmaps, self.iters if iters is None else iters)
