"""What trains on a frozen Wan DiT, and its whole life cycle: add, load, export.

One adapter object per kind, so the stage, the coupling and the export callback never ask which
kind they hold:

- :class:`PeftLoRA`: peft LoRA on named linears (4DNeX); exports a diffusers LoRA folder.
- :class:`FullFinetune`: no adapter; all of the DiT, or the parameters named by ``modules``,
  train (4Real-Video-V2's self-attention). The Lightning checkpoint holds the weights.
- :class:`~fourdgen.nn.decoupled_lora.DecoupledLoRA`: One4D's two-branch LoRA with control links;
  exports one diffusers LoRA per branch plus the links.

A coupling that needs its own kind brings it (``DiTCoupling.adapter``); otherwise the stage builds
one from its ``lora_*``/``train_modules`` arguments (:func:`default_adapter`).
"""

from __future__ import annotations

import os

from torch import nn

from fourdgen.nn.lora import ATTN_TARGETS, add_lora, load_lora, save_lora


def trainables_to_float32(transformer: nn.Module) -> None:
    """What trains is float32 (master weights, so AdamW's state is float32 too) next to a bf16 frozen
    base; compute stays bf16 through Lightning's ``bf16-mixed`` autocast, or FSDP2's
    ``MixedPrecisionPolicy(param_dtype)``, which all-gathers every parameter in bf16."""
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()


class Adapter:
    """Base: :meth:`setup` adds (or loads) the trained tensors, :meth:`export` writes them."""

    def setup(self, transformer: nn.Module, keep_trainable: tuple[str, ...] = (), init: str | None = None):
        """Make the DiT's trainable part: new adapters, or those of the export at ``init``;
        parameters whose names contain one of ``keep_trainable`` (a coupling's new layers) train too."""
        raise NotImplementedError

    def export(self, transformer: nn.Module, out_dir: str | os.PathLike, write: bool = True) -> bool:
        """Write the trained tensors in diffusers' LoRA format; False if there is nothing to export
        (the checkpoint holds them). Every FSDP rank calls it (gathering is collective)."""
        raise NotImplementedError


class PeftLoRA(Adapter):
    """peft LoRA (B zero-initialised) on ``targets``; ``init`` loads an export instead (its rank wins)."""

    def __init__(self, rank: int = 64, alpha: float = 32, targets: tuple[str, ...] = ATTN_TARGETS):
        self.rank, self.alpha, self.targets = rank, alpha, tuple(targets)

    def setup(self, transformer, keep_trainable=(), init=None):
        if init:
            load_lora(transformer, init)  # alpha is baked into B
            for name, p in transformer.named_parameters():
                p.requires_grad_("lora_" in name or any(k in name for k in keep_trainable))
        else:
            add_lora(transformer, self.rank, self.alpha, self.targets, keep_trainable=keep_trainable)
        trainables_to_float32(transformer)

    def export(self, transformer, out_dir, write=True):
        save_lora(transformer, out_dir, write=write)
        return True


class FullFinetune(Adapter):
    """No adapter: the whole DiT trains, or only parameters whose names contain one of ``modules``.
    Trained parameters become float32 master weights (a bf16 ``base_dtype`` then only sets the frozen
    ones' dtype and the compute dtype): in bf16 (8 significant bits) an AdamW step of 1e-5 on a
    weight of 0.01 is under half a unit in the last place and rounds away."""

    def __init__(self, modules: tuple[str, ...] | None = None):
        self.modules = tuple(modules) if modules else None

    def setup(self, transformer, keep_trainable=(), init=None):
        if init:
            raise ValueError(
                f"init_lora {init}: full fine-tuning has no adapter to load; set lora_rank > 0, or "
                "resume the Lightning checkpoint with --ckpt_path"
            )
        if self.modules is not None:
            keep = self.modules + tuple(keep_trainable)
            for name, p in transformer.named_parameters():
                p.requires_grad_(any(k in name for k in keep))
            if not any(p.requires_grad for p in transformer.parameters()):
                raise ValueError(
                    f"train_modules {list(self.modules)}: no DiT parameter name contains any of them"
                )
        trainables_to_float32(transformer)

    def export(self, transformer, out_dir, write=True):
        return False


def default_adapter(
    lora_rank: int, lora_alpha: float, lora_targets, init_lora: str | None, train_modules
) -> Adapter:
    """The stage's adapter from its arguments: LoRA when ``lora_rank > 0`` or an export to start
    from is given, else full fine-tuning (of ``train_modules`` if given)."""
    if lora_rank > 0 or init_lora:
        return PeftLoRA(lora_rank, lora_alpha, tuple(lora_targets or ATTN_TARGETS))
    return FullFinetune(train_modules)
