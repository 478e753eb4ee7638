"""Image metrics: PSNR, SSIM (torchmetrics) and LPIPS (``lpips`` package, offline weights).

Images are ``[B, 3, H, W]`` (a single ``[3, H, W]`` is treated as B=1). PSNR and SSIM are per
image and then averaged, the usual novel-view-synthesis protocol.

LPIPS needs ImageNet backbone weights, which the ``lpips`` package would download through
torchvision. Nothing is downloaded here: pass ``backbone_weights``, a local torchvision state
dict (the full model, e.g. ``alexnet-owt-7be5be79.pth``, or just its ``features``). The small
calibrated linear layers ship inside the ``lpips`` package and are always used.
"""

from __future__ import annotations

import os
import warnings

import lpips as lpips_pkg
import torch
from lpips.lpips import ScalingLayer
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

_NET_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg", "squeeze": "squeeze"}
_NET_ALIASES["squeezenet"] = _NET_ALIASES["squeezenet1_1"] = "squeeze"
_warned_random_backbone = False


def _as_batch(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim == 3:
        pred, target = pred[None], target[None]
    if pred.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got {tuple(pred.shape)}")
    return pred, target.to(pred)


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0, reduction: str = "mean") -> Tensor:
    """Peak signal-to-noise ratio in dB, per image then averaged (``"none"`` gives ``[B]``)."""
    pred, target = _as_batch(pred, target)
    per_image = peak_signal_noise_ratio(pred, target, data_range=data_range, reduction="none", dim=(1, 2, 3))
    return _reduce(per_image, reduction)


def pooled_psnr(
    pred: Tensor, target: Tensor, mask: Tensor | None = None, data_range: float = 1.0, eps: float = 1e-10
) -> Tensor:
    """PSNR in dB of the squared error pooled over all elements, or over those where ``mask``.

    ``pred``, ``target`` (and the boolean ``mask``) are tensors of one shape, any layout (e.g. one
    image ``[1, 3, H, W]``, or a batch whose masked pixels are pooled across images, unlike
    :func:`psnr`'s per-image mean). Returns a scalar, ``-10 log10(max(MSE / data_range^2, eps))``:
    identical images give ``-10 log10(eps)`` (100 dB) rather than infinity. Differentiable.
    """
    diff = pred - target
    if mask is not None:
        diff = diff[mask]
    return -10 * torch.log10(((diff**2).mean() / data_range**2).clamp_min(eps))


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0, reduction: str = "mean") -> Tensor:
    """Structural similarity (Gaussian window 11, sigma 1.5), per image then averaged.
    Needs H, W >= 11."""
    pred, target = _as_batch(pred, target)
    per_image = structural_similarity_index_measure(pred, target, data_range=data_range, reduction="none")
    return _reduce(per_image, reduction)


def _load_state_dict(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:  # mmap: only the feature tensors are read, not e.g. AlexNet's 200 MB classifier
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre zip) checkpoint format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def load_lpips_backbone(backbone: nn.Module, path: str) -> None:
    """Copy torchvision ``features`` weights from ``path`` into an lpips backbone (``LPIPS.net``).

    lpips splits torchvision's ``features`` Sequential into ``slice1..sliceK`` but keeps each
    layer's index as its name, so ``sliceK.N.weight`` is torchvision's ``features.N.weight``.
    Keys may carry the ``features.`` prefix (full model state dict; other keys such as the
    classifier are ignored) or not (a ``features`` state dict). Every backbone tensor must be
    found with the right shape and every feature key must be used, else ``ValueError``.
    """
    sd = _load_state_dict(os.fspath(path))
    if any(k.startswith("features.") for k in sd):
        feats = {k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}
    else:
        feats = dict(sd)
    own = backbone.state_dict()
    target = {k.split(".", 1)[1]: k for k in own}  # "3.weight" -> "slice2.3.weight"
    missing = sorted(set(target) - set(feats))
    unused = sorted(set(feats) - set(target))
    bad = [k for k in set(target) & set(feats) if feats[k].shape != own[target[k]].shape]
    if missing or unused or bad:
        raise ValueError(
            f"LPIPS backbone weights {path!r} do not match the {type(backbone).__name__} backbone: "
            f"missing {missing}, unused {unused}, wrong shape {sorted(bad)}"
        )
    with torch.no_grad():
        for src, dst in target.items():
            own[dst].copy_(feats[src])


def build_lpips_net(
    net: str = "alex", backbone_weights: str | None = None, allow_random_backbone: bool = False
) -> nn.Module:
    """An eval-mode, frozen ``lpips.LPIPS`` (v0.1, calibrated linear layers) with the backbone
    loaded from ``backbone_weights``; see :class:`LPIPS`."""
    if net not in _NET_ALIASES:
        raise ValueError(f"unknown LPIPS net {net!r}; choose from {sorted(_NET_ALIASES)}")
    net = _NET_ALIASES[net]
    if backbone_weights is None and not allow_random_backbone:
        raise ValueError(
            "LPIPS needs ImageNet backbone weights and nothing may be downloaded: pass backbone_weights="
            f"<local torchvision {net} state dict>, or allow_random_backbone=True for a random backbone "
            "(values then NOT comparable to published LPIPS)."
        )
    with warnings.catch_warnings():  # lpips still calls torchvision with the deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        # With a weights file every tensor is overwritten below, so skip the costly random init.
        with torch.device("meta" if backbone_weights is not None else "cpu"):
            model = lpips_pkg.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    if backbone_weights is not None:
        model = model.to_empty(device="cpu")
        load_lpips_backbone(model.net, backbone_weights)
    # Buffers made under the meta device are garbage after to_empty: rebuild the constant layer.
    model.scaling_layer = ScalingLayer()
    # Load the calibrated linear layers ourselves: lpips loads them with strict=False, silently.
    lin_path = os.path.join(os.path.dirname(lpips_pkg.__file__), "weights", "v0.1", f"{net}.pth")
    lin_sd = torch.load(lin_path, map_location="cpu", weights_only=True)
    lin_names = {k for k, _ in model.named_parameters() if k.startswith("lin") and not k.startswith("lins.")}
    if set(lin_sd) != lin_names:
        raise RuntimeError(f"lpips linear weights {lin_path} do not match the model: {sorted(lin_sd)}")
    with torch.no_grad():
        for k, v in lin_sd.items():
            model.get_parameter(k).copy_(v)
    if backbone_weights is None:
        global _warned_random_backbone
        if not _warned_random_backbone:
            _warned_random_backbone = True
            warnings.warn(
                "LPIPS with a RANDOM backbone (allow_random_backbone=True): values are not comparable "
                "to published LPIPS; use only for tests and smoke runs.",
                stacklevel=3,
            )
    return model.eval().requires_grad_(False)


class LPIPS(Metric):
    """Learned perceptual image patch similarity (lower is better), averaged over images.

    Args:
        net: backbone, ``"alex"`` (the usual choice for evaluation), ``"vgg"`` or ``"squeeze"``.
        backbone_weights: path of a local torchvision state dict for that backbone (alexnet,
            vgg16, squeezenet1_1; ``.pth`` or ``.safetensors``). Required unless
            ``allow_random_backbone``.
        allow_random_backbone: accept a randomly initialised backbone (warns once); for tests.
        normalize: True if inputs are in ``[0, 1]`` (rescaled internally); False if they are
            already in ``[-1, 1]``, lpips' native range. Inputs are not clamped.

    ``update(pred, target)`` accumulates ``[B, 3, H, W]`` batches; :meth:`score` gives per-image
    values ``[B]`` without touching the state and is differentiable w.r.t. its inputs.

    The lpips network is held outside the module tree on purpose: its frozen weights stay out of
    checkpoints and optimisers, and a parent's ``.train()`` cannot switch on its dropout. It
    follows the inputs' device lazily.
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        net: str = "alex",
        backbone_weights: str | None = None,
        allow_random_backbone: bool = False,
        normalize: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.normalize = normalize
        self.__dict__["net"] = build_lpips_net(net, backbone_weights, allow_random_backbone)
        self.add_state("score_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def score(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-image LPIPS ``[B]`` of ``pred``/``target`` ``[B, 3, H, W]`` (float32)."""
        pred, target = _as_batch(pred, target)
        if pred.shape[1] != 3:
            raise ValueError(f"LPIPS needs RGB images [B, 3, H, W], got {tuple(pred.shape)}")
        if next(self.net.parameters()).device != pred.device:
            self.net.to(pred.device)
        pred, target = pred.float(), target.float()
        if self.normalize:
            pred, target = pred * 2 - 1, target * 2 - 1
        return self.net(pred, target).reshape(-1)

    def update(self, pred: Tensor, target: Tensor) -> None:
        with torch.no_grad():
            values = self.score(pred, target)
        self.score_sum += values.sum().to(self.score_sum)
        self.count += values.numel()

    def compute(self) -> Tensor:
        return self.score_sum / self.count


class ImageMetrics(nn.Module):
    """PSNR / SSIM / LPIPS of a batch, as a dict ready for ``self.log_dict({f"test/{k}": v})``.

    Args:
        lpips_net: LPIPS backbone, or None to skip LPIPS (then no ``"lpips"`` key).
        lpips_weights, allow_random_backbone: see :class:`LPIPS`.
        data_range: value range of the images (1.0 for ``[0, 1]``).
        clamp: clamp both images to ``[0, data_range]`` first (renders can overshoot).

    ``forward(pred, target)`` with ``[B, 3, H, W]`` images in ``[0, data_range]`` returns batch
    means ``{"psnr", "ssim", "lpips"}`` as scalar tensors (no accumulated state).
    """

    def __init__(
        self,
        lpips_net: str | None = "alex",
        lpips_weights: str | None = None,
        allow_random_backbone: bool = False,
        data_range: float = 1.0,
        clamp: bool = True,
    ) -> None:
        super().__init__()
        self.data_range, self.clamp = data_range, clamp
        self.lpips = (
            None
            if lpips_net is None
            else LPIPS(lpips_net, lpips_weights, allow_random_backbone=allow_random_backbone, normalize=True)
        )

    @torch.no_grad()
    def forward(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        pred, target = _as_batch(pred.detach(), target.detach())
        pred, target = pred.float(), target.float()
        if self.clamp:
            pred, target = pred.clamp(0, self.data_range), target.clamp(0, self.data_range)
        out = {"psnr": psnr(pred, target, self.data_range), "ssim": ssim(pred, target, self.data_range)}
        if self.lpips is not None:
            out["lpips"] = self.lpips.score(pred / self.data_range, target / self.data_range).mean()
        return out
