"""How the RGB and XYZ latents share one Wan DiT in the video diffusion stage.

A recipe picks a coupling by ``class_path``; :class:`~fourdgen.stages.video.VideoDiffusion` only
calls these methods, so new couplings (multi-view grids, ...) plug in without a new module.
Implementations: :class:`fourdgen.nn.wan_fusion.WidthFusion` (4DNeX) and
:class:`fourdgen.nn.decoupled_lora.DecoupledLoRAControl` (One4D).
"""

from __future__ import annotations

from torch import Tensor, nn


def call_dit(transformer: nn.Module, hidden: Tensor, timestep: Tensor, text: Tensor, image) -> Tensor:
    """One float32 velocity from the Wan DiT, inputs cast to its dtype (couplings build ``hidden``)."""
    dtype = transformer.dtype
    out = transformer(
        hidden_states=hidden.to(dtype),
        timestep=timestep,
        encoder_hidden_states=text.to(dtype),
        encoder_hidden_states_image=None if image is None else image.to(dtype),
        return_dict=False,
    )[0]
    return out.float()


class Coupling:
    """Base class of the couplings.

    Attributes:
        trainable: substrings of the names of new parameters that train (next to any LoRA).
        owns_lora: True when the coupling installs its own adapters (the stage then adds none).
    """

    trainable: tuple[str, ...] = ()
    owns_lora: bool = False

    def install(self, transformer: nn.Module) -> nn.Module:
        """Modify the DiT in place (new layers, hooks) and return it."""
        raise NotImplementedError

    def fuse(self, rgb: Tensor, xyz: Tensor) -> Tensor:
        """RGB and XYZ latents ``[B, C, F, h, w]`` -> the tensor the sampler denoises."""
        raise NotImplementedError

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`fuse`."""
        raise NotImplementedError

    def predict(
        self, transformer: nn.Module, x: Tensor, cond: Tensor, timestep: Tensor, text: Tensor, image
    ) -> Tensor:
        """Velocity (shaped like ``x``) for noisy fused latents, conditioning channels ``cond``,
        ``timestep [B]``, text ``[B, L, D]`` and optional CLIP image tokens."""
        raise NotImplementedError
