"""How the latents a stage denoises meet one Wan DiT: the coupling protocols.

A recipe picks a coupling by ``class_path``. Two protocols share :class:`DiTCoupling` (what it
installs in the DiT, which new layers train, which adapter it needs):

- :class:`LatentCoupling` (pointmap videos, :class:`~fourdgen.stages.video.VideoDiffusion`): RGB
  and XYZ latents are fused into one tensor; conditioning arrives as channels.
  ``WidthFusion`` (4DNeX, :mod:`fourdgen.nn.wan_fusion`), ``DecoupledLoRAControl`` (One4D,
  :mod:`fourdgen.nn.decoupled_lora`).
- :class:`fourdgen.nn.grid_coupling.GridCoupling` (multi-view grids,
  :class:`~fourdgen.stages.grid.GridDiffusion`): a grid is one token sequence whose conditions
  arrive in ``GridInputs``. ``ReferenceGrid`` (4Real-Video-V2), ``ProjectionGrid`` (Full-4D).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from fourdgen.components import Recorded

if TYPE_CHECKING:
    from fourdgen.nn.adapters import Adapter


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


class DiTCoupling(Recorded):
    """Base of every coupling.

    Attributes:
        trainable: substrings of the names of new parameters that train (next to any adapter).
        adapter: the coupling's own kind of adapter (One4D's decoupled LoRA), or None: the stage's
            ``lora_*`` / ``train_modules`` arguments choose one.
    """

    trainable: tuple[str, ...] = ()
    adapter: Adapter | None = None

    def install(self, transformer: nn.Module) -> nn.Module:
        """Modify the DiT in place (new layers, processors) before the adapter; return it."""
        return transformer

    def channels(self, vae) -> int:
        """DiT input channels this coupling adds (none by default)."""
        return 0


class LatentCoupling(DiTCoupling):
    """RGB and XYZ latents ``[B, C, F, h, w]`` fused into one tensor the sampler denoises."""

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
