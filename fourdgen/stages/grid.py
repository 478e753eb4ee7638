"""Stage 1b: synchronized multi-view video grids on a Wan DiT (4Real-Video-V2, Full-4D).

A grid of V views x T frames (rows: fixed viewpoints; columns: instants) is denoised as one token
sequence (:mod:`fourdgen.nn.grid_layout`) with fused view-time attention. The ``coupling``
component decides how conditions enter (:class:`~fourdgen.nn.grid_coupling.ReferenceGrid`:
reference row/column as patch embeddings; :class:`~fourdgen.nn.grid_coupling.ProjectionGrid`:
point-cloud projections along frames + camera encoders). Model set-up, adapters, FSDP2,
checkpoints and the optimizer are :class:`~fourdgen.stages.dit.DiTFinetune`'s.

Training lets the coupling reorder each clip's views (:meth:`GridCoupling.training_batch`: Full-4D's
random source view and target order); validation and prediction keep the batch's order. Validation
samples each grid and scores PSNR / SSIM / LPIPS on the generated (not given) cells against the
held-out ground truth; prediction returns grids for :class:`~fourdgen.callbacks.grid.GridVideoWriter`.
In both, the source row (Full-4D's input video) is the input itself, not its regenerated copy.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from fourdgen.batch import GridBatch
from fourdgen.callbacks.grid import grid_mosaic
from fourdgen.diffusion.flow import add_noise, euler_sample_known, flow_loss, sample_sigmas, velocity_target
from fourdgen.diffusion.latents import decode_video, encode_video, scale_factors
from fourdgen.media import log_video
from fourdgen.metrics.image import ImageMetrics
from fourdgen.nn.grid_coupling import GridCoupling, GridInputs, ReferenceGrid
from fourdgen.nn.grid_layout import sequence_to_grid
from fourdgen.stages.common import sample_generators, step_generator
from fourdgen.stages.dit import DiTFinetune


class GridDiffusion(DiTFinetune):
    """Multi-view grid diffusion.

    Args (besides :class:`~fourdgen.stages.dit.DiTFinetune`'s model, adapter, optimizer and sampling
    ones; here ``lora_rank`` defaults to 0, full fine-tuning, and ``lr`` to 1e-5):
        coupling: :class:`ReferenceGrid` (4Real-Video-V2) or ``ProjectionGrid`` (Full-4D).
        clip_schedule: progressive clip length (4Real-Video-V2): ``{step: frames}``; from each step
            on, training clips keep their first ``frames`` frames (1 + 4k). None: full clips.
        lpips_net / lpips_weights / lpips_allow_random_backbone: validation LPIPS (None: skip).
    """

    def __init__(
        self,
        coupling: GridCoupling | None = None,
        lora_rank: int = 0,
        lr: float = 1e-5,
        clip_schedule: dict[int, int] | None = None,
        lpips_net: str | None = "alex",
        lpips_weights: str | None = None,
        lpips_allow_random_backbone: bool = False,
        **kwargs,
    ):
        super().__init__(coupling=coupling or ReferenceGrid(), lora_rank=lora_rank, lr=lr, **kwargs)
        self.clip_schedule = {int(k): int(v) for k, v in (clip_schedule or {}).items()}
        self.metrics = (
            None
            if lpips_net is None
            else ImageMetrics(lpips_net, lpips_weights, allow_random_backbone=lpips_allow_random_backbone)
        )
        self._psnr_only = ImageMetrics(None) if lpips_net is None else None

    def input_channels(self, vae) -> int:
        return self.coupling.channels(vae)

    def batch_needs(self, loop: str) -> list[tuple[tuple[str, ...], str]]:
        return super().batch_needs(loop) + self.coupling.batch_needs()

    def velocity(self, x: Tensor, inp: GridInputs, timestep: Tensor, text: Tensor, image) -> Tensor:
        """DiT velocity for noisy grid latents ``x [B, C, V F, h, w]`` of the problem ``inp``."""
        self._check_image_tokens(text, image)
        return self.coupling.predict(self.transformer, x, inp, timestep, text, image)

    # ------------------------------------------------------------------------------ latents
    def encode_grid(self, rgb: Tensor) -> Tensor:
        """Pixels ``[B, V, T, 3, H, W]`` -> per-view latents ``[B, V, C, F, h, w]`` (a view = a video)."""
        B, V = rgb.shape[:2]
        lat = encode_video(self.vae, rearrange(rgb, "b v t c h w -> (b v) c t h w"))
        return rearrange(lat, "(b v) c f h w -> b v c f h w", b=B, v=V)

    def decode_grid(self, x: Tensor, views: int) -> Tensor:
        """Sequence latents ``[B, C, V F, h, w]`` -> pixels ``[B, V, T, 3, H, W]`` in [-1, 1]."""
        lat = sequence_to_grid(x, views)
        B = lat.shape[0]
        rgb = decode_video(self.vae, rearrange(lat, "b v c f h w -> (b v) c f h w"))
        return rearrange(rgb, "(b v) c t h w -> b v t c h w", b=B, v=views)

    def prepare(self, b: GridBatch) -> GridInputs:
        if b.text_embeds is None:
            raise ValueError("GridBatch.text_embeds is required (use a DataModule with a text encoder)")
        t = scale_factors(self.vae)[0]
        if (b.shape[2] - 1) % t:
            raise ValueError(f"GridBatch.rgb: clips need 1 + {t} k frames (Wan VAE), got T={b.shape[2]}")
        return self.coupling.prepare(b, self.encode_grid(b.rgb), self.encode_grid, t)

    def clip_frames(self, step: int) -> int | None:
        """Training clip length at ``step`` under ``clip_schedule`` (None: full clips)."""
        frames = [v for k, v in sorted(self.clip_schedule.items()) if k <= step]
        return frames[-1] if frames else None

    def crop(self, b: GridBatch, frames: int | None) -> GridBatch:
        """The batch's first ``frames`` frames (every per-frame field)."""
        if frames is None or frames >= b.shape[2]:
            return b
        out = GridBatch(**{f: getattr(b, f) for f in b.__dataclass_fields__})
        for name in ("rgb", "w2c", "observed", "xyz", "depth", "mask"):
            x = getattr(b, name)
            if x is not None:
                setattr(out, name, x[:, :, :frames])
        out.times, out.time_ids = b.times[:, :frames], b.time_ids[:, :frames]
        return out

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: GridBatch, batch_idx: int) -> Tensor:
        b = self.crop(GridBatch.coerce(batch), self.clip_frames(self.global_step))
        # Per-clip generators of (seed, step, rank): the global RNG would make each rank's and a
        # resumed run's view orders depend on what else drew from it (loader workers, other layers).
        gens = sample_generators(self.global_step, b.shape[0], stream=self.global_rank, purpose="views")
        b = self.coupling.training_batch(b, gens)
        h = self.hparams
        inp = self.prepare(b)
        x0 = inp.x0
        # Drawn from (seed, step, rank), not the global RNG: a resumed run draws what it would have.
        g = step_generator(self.global_step, stream=self.global_rank)
        sigma = sample_sigmas(
            x0.shape[0], mode=h.timestep_sampling, shift=h.train_shift, device=x0.device, generator=g
        )
        noise = torch.randn(x0.shape, generator=g).to(x0)
        v = self.velocity(add_noise(x0, noise, sigma), inp, sigma * 1000, self._text(b), b.image_embeds)
        loss = flow_loss(v, velocity_target(x0, noise), sigma, h.loss_weighting, mask=inp.loss_mask)
        if not self.losses_finite({"train/loss": loss}):
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    # ------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        b: GridBatch,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        inp: GridInputs | None = None,
    ) -> Tensor:
        """Grid latents ``[B, C, V F, h, w]``; known (reference) cells are re-imposed at the noise
        level of every step and exactly at the end, so the model sees them as in training.
        ``guidance_scale=None``: the recipe's, as the coupling adapts it to the batch's references."""
        h = self.hparams
        inp = inp or self.prepare(b)
        noise = torch.randn(inp.x0.shape, generator=generator).to(self.device)
        text, image = self._text(b), b.image_embeds
        # The coupling may turn CFG off for this batch (4Real-Video-V2 with both references).
        w = (
            self.coupling.guidance_scale(b.observed, h.guidance_scale)
            if guidance_scale is None
            else guidance_scale
        )
        uncond = None
        if w != 1.0:
            neg = self._text(b, negative=True)
            uncond = lambda x, t: self.velocity(x, inp, t, neg, image)  # noqa: E731
        return euler_sample_known(
            lambda x, t: self.velocity(x, inp, t, text, image),
            noise,
            inp.x0,
            inp.known,
            num_steps=num_steps or h.sample_steps,
            shift=h.sample_shift,
            guidance_scale=w,
            uncond_velocity=uncond,
        )

    def keep_source(self, rgb: Tensor, b: GridBatch) -> Tensor:
        """``rgb [B, V, T, 3, H, W]`` with the coupling's source row replaced by the input video
        (``b.rgb``): the decoded sample of a given row is only a VAE round trip of it."""
        s = self.coupling.source
        if s is None:
            return rgb
        rgb = rgb.clone()
        rgb[:, s] = b.rgb[:, s].to(rgb)
        return rgb

    # ---------------------------------------------------------------------------- validation
    def score(self, pred: Tensor, b: GridBatch) -> dict[str, Tensor]:
        """PSNR / SSIM / LPIPS over the generated cells, ``pred [B, V, T, 3, H, W]`` in [-1, 1]."""
        cells = ~self.coupling.given_cells(b.observed, scale_factors(self.vae)[0])
        if not cells.any():
            return {}
        p = (pred[cells].float() + 1) / 2
        g = (b.rgb[cells].float() + 1) / 2
        return (self.metrics or self._psnr_only)(p, g)

    def validation_step(self, batch: GridBatch, batch_idx: int) -> None:
        b = GridBatch.coerce(batch)
        inp = self.prepare(b)
        g = torch.Generator().manual_seed(batch_idx)
        x = self.sample(b, num_steps=self.hparams.val_sample_steps, generator=g, inp=inp)
        B = x.shape[0]
        self.log("val/latent_mse", ((x - inp.x0) ** 2).mean(), batch_size=B)
        rgb = self.keep_source(self.decode_grid(x, inp.views), b)
        for k, v in self.score(rgb, b).items():
            self.log(f"val/{k}", v, batch_size=B)
        if batch_idx == 0:
            both = (torch.cat([rgb[0], b.rgb[0].to(rgb)]).float() + 1) / 2  # generated row, then truth
            mosaic = grid_mosaic(both.clamp(0, 1), cols=inp.views).permute(0, 3, 1, 2)
            log_video(self.loggers, "val/grid", mosaic, self.global_step)

    def predict_step(self, batch: GridBatch, batch_idx: int) -> list[dict]:
        """One clip dict per grid for :func:`~fourdgen.callbacks.grid.write_grid`: ``rgb [V, T, 3, H, W]``
        (the source row as given), cameras (None when unknown), ``observed [V, T]`` (the cells given),
        ``source_view`` (int, or None) and ``depth [T, H, W]``, the source view's depth the projection
        used (None without a projection)."""
        b = GridBatch.coerce(batch)
        g = torch.Generator().manual_seed(batch_idx)
        inp = self.prepare(b)
        rgb = self.keep_source(self.decode_grid(self.sample(b, generator=g, inp=inp), inp.views), b)
        known_cams = self.coupling.uses_cameras  # 4Real-Video-V2 infers views: no cameras
        # What was given, as the coupling used it (Full-4D: the source row, whatever b.observed says).
        given = self.coupling.given_cells(b.observed, scale_factors(self.vae)[0])
        s, depth = self.coupling.source, inp.source_depth
        out = []
        for i in range(rgb.shape[0]):
            out.append(
                {
                    "scene_id": b.scene_id[i] if b.scene_id else f"grid{batch_idx}_{i}",
                    "rgb": rgb[i].float().cpu(),
                    "K": b.K[i].float().cpu() if known_cams else None,
                    "w2c": b.w2c[i].float().cpu() if known_cams else None,
                    "caption": b.caption[i] if b.caption else "",
                    "observed": given[i].cpu(),
                    "source_view": s,
                    "depth": None if depth is None else depth[i].float().cpu(),  # [T, H, W], row s
                }
            )
        return out
