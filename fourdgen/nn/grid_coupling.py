"""How a multi-view grid is fed to the Wan DiT: a recipe picks one by ``class_path``.

- :class:`ReferenceGrid` (4Real-Video-V2): fused view-time self-attention replaces Wan's (same
  weights, no new parameters); reference cells (a fixed-view row and a freeze-time column, the
  batch's ``observed`` cells) are added as patch embeddings to the noised tokens; no cameras.
- :class:`ProjectionGrid` (Full-4D): each view's target latents are followed along frames by the
  latents of the source video's point cloud rendered into that view; per-video self-attention is
  kept and a zero-initialised fused branch plus a per-block camera encoder are added.

Both denoise the grid's latents in sequence order ``[B, C, V F, h, w]`` (:mod:`~fourdgen.nn.grid_layout`).
A coupling may also reorder a training batch's views (:meth:`GridCoupling.training_batch`; Full-4D draws
a random source view and target order per clip).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fourdgen.batch import GridBatch
from fourdgen.components import Recorded
from fourdgen.geometry.pointcloud import render_pointmap_to_view
from fourdgen.geometry.projection import depth_to_points
from fourdgen.nn.coupling import DiTCoupling, call_dit
from fourdgen.nn.fused_attention import BACKENDS, GridAttentionState
from fourdgen.nn.grid_layout import GridLayout, grid_to_sequence, sequence_to_grid
from fourdgen.nn.grid_views import (
    cells,
    has_both_references,
    latent_frames_observed,
    per_clip,
    permute_views,
    random_view_order,
    reversal_order,
)
from fourdgen.nn.multiview import install_grid, relative_cameras
from fourdgen.nn.view_time_mask import CONDITION_TERMS, PREDICATES, ViewTimeMask

Encoder = Callable[[Tensor], Tensor]  # pixel grid [B, V, T, 3, H, W] -> latents [B, V, C, F, h, w]


class DepthProvider(Recorded):
    """``__call__(b, view) -> depth [B, T, H, W]`` (camera z, 0 = unknown) of one view of the batch."""

    def batch_needs(self) -> list[tuple[tuple[str, ...], str]]:
        """GridBatch fields it reads (see :meth:`fourdgen.stages.common.BatchContract.batch_needs`)."""
        return []

    def __call__(self, b: GridBatch, view: int) -> Tensor:
        raise NotImplementedError


class BatchDepth(DepthProvider):
    """Ground-truth depth from the scene files (``GridBatch.depth``)."""

    def batch_needs(self) -> list[tuple[tuple[str, ...], str]]:
        why = "the source view's depth for the projection: scenes with depth files and load_depth: true"
        return [(("depth",), why + ", or depth: PredictedDepth / MonocularDepth")]

    def __call__(self, b: GridBatch, view: int) -> Tensor:
        if b.depth is None:
            raise ValueError(
                "GridBatch.depth is missing: the projection conditioning needs the source view's depth "
                "(scenes with depth files, load_depth: true), or use PredictedDepth"
            )
        return b.depth[:, view, :, 0].float()


@dataclass
class GridInputs:
    """One grid's denoising problem, in sequence order.

    x0: ``[B, C, V F, h, w]`` clean target latents (ground truth; unknown cells may hold anything).
    loss_mask: ``[B, 1, V F, 1, 1]`` float, 1 where the loss counts (None: everywhere).
    known: ``[B, 1, V F, 1, 1]`` bool reference cells re-imposed while sampling (None: none).
    reference: ``[B, C, V F, h, w]`` reference latents, zeros elsewhere (4Real-Video-V2).
    cond: ``[B, C, V F, h, w]`` per-view condition latents (Full-4D projections).
    camera: ``[B, V, 12]`` relative cameras (Full-4D).
    source_depth: ``[B, T, H, W]`` float, the source view's depth the projection used (Full-4D).
    """

    x0: Tensor
    views: int
    loss_mask: Tensor | None = None
    known: Tensor | None = None
    reference: Tensor | None = None
    cond: Tensor | None = None
    camera: Tensor | None = None
    source_depth: Tensor | None = None


class GridCoupling(DiTCoupling):
    """Base of the grid couplings.

    Args:
        mask: :class:`~fourdgen.nn.view_time_mask.ViewTimeMask` terms of the fused attention.
        t_max: RoPE frame stride between views (Wan: 21 latent frames = 81 frames).
        backend: ``auto`` / ``flex`` / ``dense`` / ``lse`` (see
            :func:`~fourdgen.nn.fused_attention.grid_attention`).
    """

    # Whether the layout has condition frames after each view's targets (what CONDITION_TERMS read).
    condition_frames = False

    default_mask: tuple[str, ...] = ("same_view", "same_time")

    def __init__(self, mask: list[str] | None = None, t_max: int = 21, backend: str = "auto"):
        problem = type(self).mask_problem(mask) if mask is not None else None
        if problem:
            raise ValueError(f"{type(self).__name__}.mask: {problem}")
        problem = type(self).backend_problem(mask, backend)
        if problem:
            raise ValueError(f"{type(self).__name__}.backend: {problem}")
        self.mask = ViewTimeMask(mask or list(self.default_mask))
        self.t_max = t_max
        self.state = GridAttentionState(self.mask, backend)

    @classmethod
    def backend_problem(cls, terms, backend) -> str | None:
        """Why ``backend`` cannot run the mask ``terms`` (None: default mask) of this coupling, or
        None. Also run on the config (:mod:`fourdgen.config_checks`)."""
        if backend not in BACKENDS:
            return f"expected one of {', '.join(BACKENDS)}, got {backend!r}"
        if backend != "lse":
            return None
        t = set(terms or cls.default_mask)
        if not cls.condition_frames:
            t.discard("cross_half")  # never holds without condition frames
        if not {"same_view", "same_time"} <= t <= {"same_view", "same_time", "same_frame"}:
            return (
                f"'lse' computes exactly same_view | same_time; the mask {sorted(t)} needs 'flex' "
                "(or 'auto', which picks it)"
            )
        return None

    uses_cameras = False  # whether the batch's cameras mean anything to the model

    @classmethod
    def mask_problem(cls, terms) -> str | None:
        """Why the mask ``terms`` do not fit this coupling (None: they do). Also run on the config,
        before anything is built (:mod:`fourdgen.config_checks`)."""
        if isinstance(terms, str) or not isinstance(terms, list | tuple) or not terms:
            return f"expected a non-empty list of {', '.join(PREDICATES)}, got {terms!r}"
        for t in terms:
            if t not in PREDICATES:
                return f"{t!r} is not one of {', '.join(PREDICATES)}"
            if t in CONDITION_TERMS and not cls.condition_frames:
                return (
                    f"{t!r} attends to condition frames, which the {cls.__name__} layout does not have "
                    "(only ProjectionGrid's does); use same_view/same_time"
                )
        return None

    def channels(self, vae) -> int:
        """Extra DiT input channels (none: conditions enter as tokens)."""
        return 0

    def given_cells(self, observed: Tensor, t_factor: int) -> Tensor:
        """``[B, V, T]`` bool: pixel cells that are inputs, not generated (skipped by metrics)."""
        raise NotImplementedError

    def prepare(self, b: GridBatch, latents: Tensor, encode: Encoder, t_factor: int) -> GridInputs:
        """The denoising problem of batch ``b`` with per-view latents ``[B, V, C, F, h, w]``."""
        raise NotImplementedError

    @property
    def source(self) -> int | None:
        """The row holding the input video (kept as given in outputs), or None (no such row)."""
        return None

    def batch_needs(self) -> list[tuple[tuple[str, ...], str]]:
        """Optional GridBatch fields it reads (``[(fields, why)]``, as the stage's ``batch_needs``)."""
        return []

    def training_batch(self, b: GridBatch, generators: list[torch.Generator] | None = None) -> GridBatch:
        """The batch as a training step sees it (validation and prediction use ``b`` as is). Random
        choices for clip ``i`` come from ``generators[i]`` (None: torch's global RNG)."""
        return b

    def guidance_scale(self, observed: Tensor, scale: float) -> float:
        """The CFG scale for sampling clips given ``observed [B, V, T]`` (the recipe's ``scale``)."""
        return scale

    def layout(
        self,
        hidden: Tensor,
        views: int,
        patch: tuple[int, int, int],
        target_frames: int | None = None,
        source_view: int = 0,
    ) -> GridLayout:
        """Layout of the DiT input ``hidden [B, C, V F, h p, w p]``."""
        _, _, n, h, w = hidden.shape
        return GridLayout(
            views, n // views, h // patch[1], w // patch[2], self.t_max, target_frames, source_view
        )

    def _call(
        self, transformer, hidden, timestep, text, image, layout, camera=None, reference=None
    ) -> Tensor:
        # The state stays set after the call: gradient checkpointing re-runs the blocks during
        # backward and must see this call's layout again. The next grid call replaces it.
        s = self.state
        s.layout, s.camera, s.reference = layout, camera, reference
        return call_dit(transformer, hidden, timestep, text, image)

    def predict(
        self, transformer, x: Tensor, inp: GridInputs, timestep: Tensor, text: Tensor, image
    ) -> Tensor:
        """Velocity ``[B, C, V F, h, w]`` for the noisy grid latents ``x`` of problem ``inp``."""
        raise NotImplementedError


class ReferenceGrid(GridCoupling):
    """4Real-Video-V2 (section 3.1). Train only self-attention (recipe: ``lora_rank: 0``,
    ``train_modules: [attn1.]``); the loss skips reference cells, sampling re-imposes them.

    Args (besides :class:`GridCoupling`'s):
        reverse_views: training only (appendix B): the probability that a clip's views are taken in
            reverse order. The references stay where the batch marks them (row 0 and column 0), so
            the fixed-view row becomes the clip's last view and the trajectory runs backwards.
        cfg_with_both_references: appendix B finds CFG unnecessary when a fixed-view row and a
            freeze-time column are both given: False (default) samples those clips without it
            (one DiT call per step); with one reference the recipe's ``guidance_scale`` applies.
    """

    def __init__(
        self,
        mask: list[str] | None = None,
        t_max: int = 21,
        backend: str = "auto",
        reverse_views: float = 0.5,
        cfg_with_both_references: bool = False,
    ):
        super().__init__(mask, t_max, backend)
        if not 0.0 <= reverse_views <= 1.0:
            raise ValueError(f"ReferenceGrid: reverse_views is a probability, got {reverse_views}")
        self.reverse_views, self.cfg_with_both_references = reverse_views, cfg_with_both_references

    def training_batch(self, b: GridBatch, generators: list[torch.Generator] | None = None) -> GridBatch:
        """Each clip's views reversed with probability ``reverse_views`` (clip ``i`` draws from
        ``generators[i]``, else torch's global RNG); ``observed`` is kept, so the references stay in place."""
        if self.reverse_views == 0.0:
            return b
        B, V = b.shape[:2]
        flip = (
            torch.stack([torch.rand((), generator=g) for g in per_clip(generators, B)]) < self.reverse_views
        )
        flip = flip.reshape(B)
        return dataclasses.replace(permute_views(b, reversal_order(flip, V)), observed=b.observed)

    def guidance_scale(self, observed: Tensor, scale: float) -> float:
        """1 (no CFG) when every clip has both reference videos, unless ``cfg_with_both_references``;
        a batch mixing both kinds keeps ``scale`` (the sampler takes one scale per batch)."""
        if not self.cfg_with_both_references and bool(has_both_references(observed).all()):
            return 1.0
        return scale

    def install(self, transformer: nn.Module) -> nn.Module:
        return install_grid(transformer, self.state, branch=False, reference=True)

    def given_cells(self, observed: Tensor, t_factor: int) -> Tensor:
        """Pixel cells inside a reference latent frame."""
        lat = latent_frames_observed(observed, t_factor)
        return torch.cat([lat[..., :1], lat[..., 1:].repeat_interleave(t_factor, dim=-1)], dim=-1)

    def prepare(self, b: GridBatch, latents: Tensor, encode: Encoder, t_factor: int) -> GridInputs:
        known = latent_frames_observed(b.observed, t_factor).to(latents.device)  # [B, V, F]
        ref = latents * known[:, :, None, :, None, None].to(latents)
        return GridInputs(
            x0=grid_to_sequence(latents),
            views=latents.shape[1],
            loss_mask=cells(~known).float(),
            known=cells(known),
            reference=grid_to_sequence(ref),
        )

    def predict(
        self, transformer, x: Tensor, inp: GridInputs, timestep: Tensor, text: Tensor, image
    ) -> Tensor:
        layout = self.layout(x, inp.views, transformer.config.patch_size)
        return self._call(transformer, x, timestep, text, image, layout, reference=inp.reference)


class ProjectionGrid(GridCoupling):
    """Full-4D (section 3.2): the source view's depth lifts its video to a dynamic point cloud,
    rendered into every view's camera at every frame (coarse guidance); per view the noised target
    latents and the rendered-condition latents are concatenated along frames; a zero-initialised
    fused branch and camera encoder per block learn the rest.

    Args:
        depth: :class:`~fourdgen.data.depth_providers.DepthProvider` of the source view.
        source_view: the input video's row (its own projection is the input video itself); the
            fused mask's ``cross_half`` term reads this row's condition frames.
        random_order: training only (paper 4.2): each clip's views are permuted at random, so row
            ``source_view`` holds a random one of them and the others follow in random order. Needs a
            depth provider that reads the permuted batch's row (``BatchDepth``, ``MonocularDepth``);
            ``PredictedDepth`` reads the clip's stage-1a depth whatever the row.
        radius_px: point splat size of the projection.
        clean_condition_timestep: condition tokens get timestep 0 (they are clean), via diffusers'
            per-token timesteps (Wan2.2-TI2V treats its clean first frame the same way); False gives
            them the noised tokens' timestep.
        mask: default ``[same_view, same_time, cross_half]``.
    """

    trainable = ("fused_attn", "fused_proj", "camera_encoder")
    uses_cameras = True
    condition_frames = True
    default_mask = ("same_view", "same_time", "cross_half")

    def __init__(
        self,
        mask: list[str] | None = None,
        t_max: int = 21,
        backend: str = "auto",
        depth: DepthProvider | None = None,
        source_view: int = 0,
        random_order: bool = True,
        radius_px: int = 1,
        clean_condition_timestep: bool = True,
    ):
        super().__init__(mask, t_max, backend)
        if isinstance(source_view, bool) or not isinstance(source_view, int) or source_view < 0:
            raise ValueError(f"ProjectionGrid: source_view must be an int >= 0, got {source_view!r}")
        self.depth = depth or BatchDepth()
        self.source_view, self.radius_px = source_view, radius_px
        self.random_order = random_order
        self.clean_condition_timestep = clean_condition_timestep

    @property
    def source(self) -> int:
        return self.source_view

    def batch_needs(self) -> list[tuple[tuple[str, ...], str]]:
        return self.depth.batch_needs()

    def _check_views(self, V: int) -> None:
        if self.source_view >= V:
            raise ValueError(f"ProjectionGrid: source_view={self.source_view}, but the grid has {V} views")

    def training_batch(self, b: GridBatch, generators: list[torch.Generator] | None = None) -> GridBatch:
        """A random view order per clip (``random_order``; clip ``i`` draws from ``generators[i]``),
        else ``b``."""
        if not self.random_order:
            return b
        B, V = b.shape[:2]
        return permute_views(b, random_view_order(B, V, generators))

    def install(self, transformer: nn.Module) -> nn.Module:
        return install_grid(transformer, self.state, branch=True)

    def given_cells(self, observed: Tensor, t_factor: int) -> Tensor:
        """The source view's row (the input video)."""
        self._check_views(observed.shape[1])
        given = torch.zeros_like(observed)
        given[:, self.source_view] = True
        return given

    def source_depth(self, b: GridBatch) -> Tensor:
        """The source view's depth ``[B, T, H, W]`` float from the depth provider."""
        self._check_views(b.shape[1])
        return self.depth(b, self.source_view).float()

    def project(self, b: GridBatch, depth: Tensor | None = None) -> Tensor:
        """The source view rendered into every view: ``[B, V, T, 3, H, W]`` in [-1, 1] (holes -1).
        ``depth [B, T, H, W]``: the source view's (None: from the depth provider)."""
        B, V, T, H, W = b.shape
        s = self.source_view
        depth = self.source_depth(b) if depth is None else depth
        pts = depth_to_points(depth, b.K[:, s, None].expand(B, T, 3, 3).float(), b.w2c[:, s].float())
        img, _, _ = render_pointmap_to_view(
            pts[:, None],
            b.rgb[:, s, None].float(),
            b.K[:, :, None].float(),
            b.w2c.float(),
            H,
            W,
            valid=(depth > 0)[:, None],
            radius_px=self.radius_px,
            background=-1.0,
        )
        return img

    def prepare(
        self, b: GridBatch, latents: Tensor, encode: Encoder, t_factor: int, depth: Tensor | None = None
    ) -> GridInputs:
        """``depth [B, T, H, W]``: the source view's, when the caller has it (None: the provider's)."""
        if depth is None:
            depth = self.source_depth(b)  # once: a predicted depth is costly, and outputs report it
        cond = encode(self.project(b, depth=depth))
        return GridInputs(
            x0=grid_to_sequence(latents),
            views=latents.shape[1],
            cond=grid_to_sequence(cond),
            camera=relative_cameras(b.w2c[:, :, 0].float(), self.source_view).to(latents),
            source_depth=depth,
        )

    def predict(
        self, transformer, x: Tensor, inp: GridInputs, timestep: Tensor, text: Tensor, image
    ) -> Tensor:
        V = inp.views
        tgt, cnd = sequence_to_grid(x, V), sequence_to_grid(inp.cond.to(x), V)
        F = tgt.shape[3]
        hidden = grid_to_sequence(torch.cat([tgt, cnd], dim=3))  # per view: [target F | condition F]
        layout = self.layout(
            hidden, V, transformer.config.patch_size, target_frames=F, source_view=self.source_view
        )
        if self.clean_condition_timestep:
            per_frame = torch.cat([torch.ones(F), torch.zeros(F)]).repeat(V).to(timestep)  # [V 2F]
            timestep = (timestep[:, None] * per_frame).repeat_interleave(layout.frame_tokens, dim=1)
        out = self._call(transformer, hidden, timestep, text, image, layout, camera=inp.camera)
        return grid_to_sequence(sequence_to_grid(out, V)[:, :, :, :F])
