"""One4D's Decoupled LoRA Control (DLC, section 3.2) on a diffusers Wan DiT.

Every targeted linear layer keeps its frozen base weight and gets two LoRA adapters, one per
branch (RGB, XYZ). Both branches run the whole DiT in one call, stacked along the batch: the first
half of the batch is the RGB branch, the second half the XYZ branch. Attention never mixes batch
entries, so the two computations are disjoint; zero-initialised linear control links at a few
blocks add each branch's features into the other.

Why not peft: peft's adapter switching is global state (``set_adapter``), so a recomputation under
gradient checkpointing would run whichever adapter is active at backward, and its mixed-batch
``adapter_names`` raises in training mode (peft allows mixed-adapter batches at inference only).
Here the branch of every token is fixed by its batch position, which :func:`stack_branches` sets
explicitly, so a recomputed block routes exactly like the first pass. Hooks keep the stock parameter
names (``blocks.0.attn1.to_q.weight``), so pretrained weights load unchanged; the new tensors live in
``<linear>.dlc.*`` and ``dlc_links.*``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from fourdgen.nn.adapters import Adapter, trainables_to_float32
from fourdgen.nn.coupling import LatentCoupling, call_dit

BRANCHES = ("rgb", "xyz")


class BranchLoRA(nn.Module):
    """Two LoRA adapters of one ``in -> out`` linear layer: ``delta_b(x) = s * B_b(A_b(x))``, with
    ``s = alpha / rank``, A drawn as peft does (Kaiming uniform) and B zero: the layer is unchanged
    at first."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.rank, self.scale = rank, alpha / rank
        for b in BRANCHES:
            a = nn.Linear(in_features, rank, bias=False)
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            up = nn.Linear(rank, out_features, bias=False)
            nn.init.zeros_(up.weight)
            self.add_module(f"lora_A_{b}", a)
            self.add_module(f"lora_B_{b}", up)

    def delta(self, x: Tensor, branch: str) -> Tensor:
        a, up = getattr(self, f"lora_A_{branch}"), getattr(self, f"lora_B_{branch}")
        return up(a(x.to(a.weight.dtype))) * self.scale


def _lora_hook(linear: nn.Linear, args: tuple, out: Tensor) -> Tensor:
    x = args[0]
    n = x.shape[0] // 2  # [RGB batch; XYZ batch] (stack_branches)
    delta = torch.cat([linear.dlc.delta(x[:n], "rgb"), linear.dlc.delta(x[n:], "xyz")])
    return out + delta.to(out.dtype)


class ControlLink(nn.Module):
    """Zero-initialised links of one block: ``rgb += x2r(xyz)``, ``xyz += r2x(rgb)``, both from the
    block's outputs before either update (One4D eq. 4 leaves the order open; simultaneous keeps the
    two directions symmetric)."""

    def __init__(self, dim: int):
        super().__init__()
        self.rgb_to_xyz = nn.Linear(dim, dim)
        self.xyz_to_rgb = nn.Linear(dim, dim)
        for m in (self.rgb_to_xyz, self.xyz_to_rgb):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, h: Tensor) -> Tensor:
        """``h [2B, N, D]`` (RGB then XYZ) -> linked features, same shape."""
        rgb, xyz = h.chunk(2)
        dtype = self.rgb_to_xyz.weight.dtype
        to_rgb = self.xyz_to_rgb(xyz.to(dtype)).to(h.dtype)
        to_xyz = self.rgb_to_xyz(rgb.to(dtype)).to(h.dtype)
        return torch.cat([rgb + to_rgb, xyz + to_xyz])


def _link_hook(block: nn.Module, args: tuple, out: Tensor) -> Tensor:
    return block.dlc_link(out)


def dit_linears(transformer: nn.Module, scope: str = "blocks") -> list[str]:
    """Names of the DiT's linear layers to adapt.

    ``"blocks"``: every linear inside the DiT blocks (attention, cross-attention, FFN). One4D says
    "all linear layers in the DiT" and counts 685M LoRA parameters for rank 64 on both branches:
    exactly the blocks' linears of Wan-14B-I2V (718.27e6 = 685.0 x 2^20), so the embedders and the
    output head stay shared. ``"all"`` adds those (time/text/image embedders, output projection),
    which helps a weak base (the random tiny models of the tests). The patch embedding is a
    convolution and is never adapted."""
    if scope not in ("blocks", "all"):
        raise ValueError(f"dit_linears: scope must be 'blocks' or 'all', got {scope!r}")
    return [
        n
        for n, m in transformer.named_modules()
        if isinstance(m, nn.Linear) and ".dlc" not in n and (scope == "all" or n.startswith("blocks."))
    ]


def install_dlc(
    transformer: nn.Module,
    rank: int = 64,
    alpha: float = 64,
    targets: str | list[str] = "blocks",
    link_layers: tuple[int, ...] | None = None,
) -> nn.Module:
    """Add two-branch LoRA to ``targets`` (module names, or a :func:`dit_linears` scope) and control
    links after the blocks in ``link_layers`` (default: :func:`default_link_layers`, five); freeze
    everything else. Returns the transformer, which must then be called with :func:`stack_branches`
    inputs (batch = [RGB; XYZ])."""
    if getattr(transformer, "dlc_installed", False):
        raise ValueError("install_dlc: the transformer already has DLC adapters")
    transformer.requires_grad_(False)
    modules = dict(transformer.named_modules())
    for name in dit_linears(transformer, targets) if isinstance(targets, str) else targets:
        linear = modules[name]
        # Built where the weight lives (meta under FSDP's deferred init, or the GPU): 685M adapter
        # parameters initialised on CPU and then moved took 26 s at 14B.
        with torch.device(linear.weight.device):
            linear.dlc = BranchLoRA(linear.in_features, linear.out_features, rank, alpha)
        linear.register_forward_hook(_lora_hook)
    n_blocks = len(transformer.blocks)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    if link_layers is None:
        link_layers = default_link_layers(n_blocks)
    for i in link_layers:
        if not -n_blocks <= i < n_blocks:
            raise ValueError(f"install_dlc: link layer {i} outside the DiT's {n_blocks} blocks")
        block = transformer.blocks[i]
        with torch.device(next(block.parameters()).device):
            block.dlc_link = ControlLink(dim)
        block.register_forward_hook(_link_hook)
    transformer.dlc_installed = True
    for name, p in transformer.named_parameters():
        p.requires_grad_(".dlc." in name or "dlc_link." in name)
    return transformer


def default_link_layers(num_blocks: int, count: int = 5) -> tuple[int, ...]:
    """``count`` blocks spread evenly from the first to the last (One4D links five of 40 and does
    not say which; even spacing lets every depth exchange information)."""
    if count <= 0:
        return ()
    if count == 1:
        return (0,)
    return tuple(sorted({round(i * (num_blocks - 1) / (count - 1)) for i in range(count)}))


def stack_branches(rgb: Tensor, xyz: Tensor) -> Tensor:
    """RGB-branch and XYZ-branch inputs ``[B, ...]`` each -> the DLC batch ``[2B, ...]``."""
    if rgb.shape != xyz.shape:
        raise ValueError(f"stack_branches: RGB {list(rgb.shape)} and XYZ {list(xyz.shape)} inputs differ")
    return torch.cat([rgb, xyz])


def split_branches(out: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`stack_branches`."""
    return out.chunk(2)


def branch_state(transformer: nn.Module, branch: str) -> dict[str, Tensor]:
    """One branch's adapter in diffusers' LoRA key layout (``<module>.lora_A.weight`` /
    ``lora_B.weight`` with alpha baked into B), loadable by ``load_lora_adapter`` into a stock
    Wan model: the RGB branch without links is exactly that stock model plus this LoRA."""
    out = {}
    for name, m in transformer.named_modules():
        if isinstance(getattr(m, "dlc", None), BranchLoRA):
            out[f"{name}.lora_A.weight"] = getattr(m.dlc, f"lora_A_{branch}").weight.detach()
            out[f"{name}.lora_B.weight"] = getattr(m.dlc, f"lora_B_{branch}").weight.detach() * m.dlc.scale
    return out


class DecoupledLoRAControl(LatentCoupling):
    """One4D's coupling of RGB and XYZ for :class:`~fourdgen.stages.video.VideoDiffusion`.

    Latents are fused along channels (``[B, 2C, F, h, w]``: RGB then XYZ) so both share one noise
    level ``t``. The DiT runs both branches in one call: the RGB branch gets the conditioning
    channels (UMC), the XYZ branch zeros in their place (One4D feeds it no condition; it learns
    them through the control links), and the stock patch embedding serves both.

    Args:
        rank / alpha: LoRA of each branch (One4D: rank 64 on all DiT linears; alpha is not given,
            ``alpha = rank`` keeps LoRA's scale at 1).
        num_links: control links spread over the blocks (One4D: 5), or ``link_layers`` explicitly.
        targets: linear layers to adapt: names, or ``"blocks"`` (One4D, see :func:`dit_linears`)
            or ``"all"``.
    """

    trainable = (".dlc.", "dlc_link.")

    def __init__(
        self,
        rank: int = 64,
        alpha: float | None = None,
        num_links: int = 5,
        link_layers: list[int] | None = None,
        targets: str | list[str] = "blocks",
    ):
        self.adapter = DecoupledLoRA(rank, alpha, num_links, link_layers, targets)

    def fuse(self, rgb: Tensor, xyz: Tensor) -> Tensor:
        """``[B, C, F, h, w]`` twice -> ``[B, 2C, F, h, w]``."""
        return torch.cat([rgb, xyz], dim=1)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.chunk(2, dim=1)

    def predict(
        self, transformer: nn.Module, x: Tensor, cond: Tensor, timestep: Tensor, text: Tensor, image
    ) -> Tensor:
        """Velocity ``[B, 2C, F, h, w]`` of both branches for noisy fused latents ``x``."""
        rgb, xyz = self.split(x)
        hidden = stack_branches(torch.cat([rgb, cond], 1), torch.cat([xyz, torch.zeros_like(cond)], 1))

        def both(t):  # both branches see the same timestep, text and image
            return None if t is None else torch.cat([t, t])

        out = call_dit(transformer, hidden, both(timestep), both(text), both(image))
        return self.fuse(*split_branches(out))


def _full(t: Tensor) -> Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().contiguous().cpu()


def save_dlc(transformer: nn.Module, out_dir: str | os.PathLike, write: bool = True) -> Path:
    """Export DLC: ``rgb/`` and ``xyz/`` each a diffusers LoRA (``pytorch_lora_weights.safetensors``,
    alpha baked into B), the control links in ``fourdgen_extra.safetensors``. Written in a temp dir
    and moved into place; every FSDP rank calls it, only ``write=True`` writes."""
    from fourdgen.nn.lora import EXTRA_FILE, LORA_FILE, write_diffusers_lora

    out = Path(out_dir)
    branches = {
        b: {f"transformer.{k}": _full(v) for k, v in branch_state(transformer, b).items()} for b in BRANCHES
    }
    links = {n: _full(p) for n, p in transformer.named_parameters() if "dlc_link." in n}
    if not write:
        return out
    rank = next(m.dlc.rank for m in transformer.modules() if isinstance(getattr(m, "dlc", None), BranchLoRA))
    targets = sorted(
        {k[len("transformer.") : -len(".lora_A.weight")] for k in branches["rgb"] if "lora_A" in k}
    )
    meta = {"r": rank, "lora_alpha": rank, "target_modules": targets}  # alpha baked into B
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for b, lora in branches.items():
            os.makedirs(os.path.join(tmp, b))
            write_diffusers_lora(
                os.path.join(tmp, b), {k.removeprefix("transformer."): v for k, v in lora.items()}, meta
            )
        save_file(links, os.path.join(tmp, EXTRA_FILE))
        for b in BRANCHES:
            (out / b).mkdir(exist_ok=True)
            os.replace(os.path.join(tmp, b, LORA_FILE), out / b / LORA_FILE)
        os.replace(os.path.join(tmp, EXTRA_FILE), out / EXTRA_FILE)
    return out


@torch.no_grad()
def load_dlc(transformer: nn.Module, lora_dir: str | os.PathLike) -> nn.Module:
    """Load a :func:`save_dlc` export into a transformer with DLC installed (same targets/links)."""
    from fourdgen.errors import FileFormatError
    from fourdgen.io import read_tensors
    from fourdgen.nn.lora import EXTRA_FILE, LORA_FILE, _lora_modules, load_extra

    d = Path(lora_dir)
    modules = dict(transformer.named_modules())
    # Every tensor of every file is checked before any is copied: a half-loaded adapter would train on.
    branches = {}
    for b in BRANCHES:
        f = d / b / LORA_FILE
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (expected a fourdgen DLC export with rgb/ and xyz/)")
        branches[b] = _lora_modules(f, read_tensors(f), transformer, "transformer.")
        for name, (a, _) in branches[b].items():
            lora, key = getattr(modules[name], "dlc", None), f"transformer.{name}.lora_A.weight"
            if not isinstance(lora, BranchLoRA):
                raise FileFormatError(f, key, "a layer with DLC installed (the same targets)", "none")
            if a.shape[0] != lora.rank:
                raise FileFormatError(f, key, f"rank {lora.rank} (the DLC installed)", a.shape[0])
    if (d / EXTRA_FILE).is_file():
        load_extra(transformer, d / EXTRA_FILE, what="control link (same link_layers?)")
    for b, pairs in branches.items():
        for name, (a, up) in pairs.items():
            lora = modules[name].dlc
            getattr(lora, f"lora_A_{b}").weight.copy_(a)
            getattr(lora, f"lora_B_{b}").weight.copy_(up / lora.scale)
    return transformer


class DecoupledLoRA(Adapter):
    """The adapter of :class:`DecoupledLoRAControl`: :func:`install_dlc` (with ``init``:
    :func:`load_dlc` of an export), exported by :func:`save_dlc`. Link layers: ``link_layers``, or
    ``num_links`` blocks spread evenly."""

    def __init__(
        self,
        rank: int = 64,
        alpha: float | None = None,
        num_links: int = 5,
        link_layers: list[int] | None = None,
        targets: str | list[str] = "blocks",
    ):
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.num_links, self.link_layers, self.targets = num_links, link_layers, targets

    def setup(self, transformer, keep_trainable=(), init=None):
        layers = self.link_layers
        if layers is None:
            layers = default_link_layers(len(transformer.blocks), self.num_links)
        install_dlc(transformer, self.rank, self.alpha, self.targets, tuple(layers))
        if init:
            load_dlc(transformer, init)
        trainables_to_float32(transformer)

    def export(self, transformer, out_dir, write=True):
        save_dlc(transformer, Path(out_dir), write=write)
        return True
