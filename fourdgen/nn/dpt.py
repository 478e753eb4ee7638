"""DPT dense-prediction head (Ranftl et al. 2021) as VGGT uses it: four transformer layers are
projected, resized to a 4-level pyramid, fused coarse-to-fine by RefineNet blocks, and upsampled
to pixels. Parameter names follow the official VGGT layout (``projects``, ``resize_layers``,
``scratch.*``) so its depth/point-head weights load unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def uv_grid(width: int, height: int, aspect_ratio: float, dtype=None, device=None) -> Tensor:
    """``[height, width, 2]`` pixel-centre coordinates spanning the image plane normalised by its
    diagonal (x in [-a, a] * (W-1)/W, y likewise, with a = aspect / sqrt(aspect^2 + 1))."""
    diag = (aspect_ratio**2 + 1.0) ** 0.5
    sx, sy = aspect_ratio / diag, 1.0 / diag
    x = torch.linspace(-sx * (width - 1) / width, sx * (width - 1) / width, width, dtype=dtype, device=device)
    y = torch.linspace(
        -sy * (height - 1) / height, sy * (height - 1) / height, height, dtype=dtype, device=device
    )
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def sincos_embed(pos: Tensor, dim: int, omega_0: float = 100.0) -> Tensor:
    """``pos [...]`` -> ``[..., dim]``: sin of ``dim/2`` geometric frequencies, then their cos
    (computed in float64 as the reference does; matters at omega_0 = 100)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / omega_0**omega
    out = pos.double()[..., None] * omega
    return torch.cat([out.sin(), out.cos()], dim=-1).float()


def uv_embedding(height: int, width: int, channels: int, aspect_ratio: float, device=None) -> Tensor:
    """``[channels, height, width]`` fixed sinusoidal embedding of :func:`uv_grid` (x then y)."""
    uv = uv_grid(width, height, aspect_ratio, device=device)
    emb = torch.cat([sincos_embed(uv[..., 0], channels // 2), sincos_embed(uv[..., 1], channels // 2)], -1)
    return emb.permute(2, 0, 1)


class ResidualConvUnit(nn.Module):
    """``relu(x) + conv2(relu(conv1(relu(x))))``: the reference applies an in-place ReLU to its
    input before the skip connection, so the skip carries ``relu(x)``; trained weights expect it."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        return x + self.conv2(F.relu(self.conv1(x)))


class FeatureFusionBlock(nn.Module):
    """``out_conv(upsample(rcu2(x + rcu1(skip))))`` to ``size`` (default: 2x)."""

    def __init__(self, features: int, has_residual: bool = True):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.has_residual = has_residual
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if self.has_residual:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        size = tuple(size) if size is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.out_conv(F.interpolate(x, size=size, mode="bilinear", align_corners=True))


class DPTHead(nn.Module):
    """Dense head over the aggregator's per-layer tokens.

    ``forward(tokens, image_hw, patch_start_idx)``: ``tokens`` a list of ``[N, P, dim_in]`` layer
    outputs (N frames, P = special + patch tokens); returns ``[N, output_dim, H, W]`` raw outputs
    (callers apply activations), or ``[N, features, H/down, W/down]`` with ``feature_only``.
    ``frames_chunk_size`` bounds memory: frames are decoded that many at a time.
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        features: int = 256,
        out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: tuple[int, int, int, int] = (4, 11, 17, 23),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
        frames_chunk_size: int | None = 8,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.intermediate_layer_idx = list(intermediate_layer_idx)
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self.frames_chunk_size = frames_chunk_size
        oc = list(out_channels)
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, c, 1) for c in oc])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], 4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], 2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], 3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for i, c in enumerate(oc, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        for i in (1, 2, 3):
            setattr(self.scratch, f"refinenet{i}", FeatureFusionBlock(features))
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        if feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, 3, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(32, output_dim, 1),
            )

    @property
    def last_conv(self) -> nn.Conv2d:
        """The final 1x1 convolution (zero it to start a residual head at 0)."""
        return self.scratch.output_conv2[2]

    def _add_pos(self, x: Tensor, aspect: float) -> Tensor:
        if not self.pos_embed:
            return x
        emb = uv_embedding(x.shape[-2], x.shape[-1], x.shape[1], aspect, device=x.device)
        return x + 0.1 * emb.to(x.dtype)

    def _decode(self, tokens: list[Tensor], hw: tuple[int, int], patch_start_idx: int) -> Tensor:
        H, W = hw
        ph, pw = H // self.patch_size, W // self.patch_size
        feats = []
        for i, layer in enumerate(self.intermediate_layer_idx):
            x = self.norm(tokens[layer][:, patch_start_idx:])
            x = rearrange(x, "n (h w) c -> n c h w", h=ph, w=pw)
            x = self._add_pos(self.projects[i](x), W / H)
            feats.append(self.resize_layers[i](x))
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i}_rn")(f) for i, f in enumerate(feats, start=1))
        out = s.refinenet4(l4, size=l3.shape[2:])
        out = s.refinenet3(out, l3, size=l2.shape[2:])
        out = s.refinenet2(out, l2, size=l1.shape[2:])
        out = s.output_conv1(s.refinenet1(out, l1))
        size = (int(ph * self.patch_size / self.down_ratio), int(pw * self.patch_size / self.down_ratio))
        out = self._add_pos(F.interpolate(out, size=size, mode="bilinear", align_corners=True), W / H)
        return out if self.feature_only else s.output_conv2(out)

    def forward(self, tokens: list[Tensor], image_hw: tuple[int, int], patch_start_idx: int) -> Tensor:
        n = next(t for t in tokens if t is not None).shape[0]  # layers no head reads may be None
        chunk = self.frames_chunk_size or n
        if chunk >= n:
            return self._decode(tokens, image_hw, patch_start_idx)
        outs = []
        for a in range(0, n, chunk):
            part = [None if t is None else t[a : a + chunk] for t in tokens]
            outs.append(self._decode(part, image_hw, patch_start_idx))
        return torch.cat(outs)
