"""Stage 1: 4D video diffusion on a Wan DiT, LoRA-tuned (4DNeX; One4D plugs in other coupling and
conditioning components).

Training: rectified flow on the coupled RGB+XYZ latents (``coupling``, a
:class:`~fourdgen.nn.coupling.LatentCoupling`), with the conditioning channels (``conditioning``)
concatenated to the noisy latents. Validation samples a clip, logs RGB/XYZ videos and scores depth
(AbsRel, delta1) and cameras (ATE, RPE-T, RPE-R) recovered by post-optimisation (``postopt``)
against ground truth, as One4D's protocol does (section 4.3, after MonST3R / Geo4D): cameras aligned
by a sim(3) Umeyama fit of their centres, depth by one scale (or scale and shift) per sequence. Prediction
returns RGB and pointmap videos, cameras, depth and point clouds. Model set-up, adapters, FSDP2,
checkpoints and the optimizer are :class:`~fourdgen.stages.dit.DiTFinetune`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fourdgen.batch import GridBatch
from fourdgen.components import build
from fourdgen.diffusion.conditioning import Conditioning, GuidedFirstFrame
from fourdgen.diffusion.flow import (
    SAMPLERS,
    add_noise,
    euler_sample,
    flow_loss,
    sample_sigmas,
    velocity_target,
)
from fourdgen.diffusion.latents import (
    decode_video,
    encode_pointmaps,
    encode_video,
    prepare_pointmaps,
    scale_factors,
)
from fourdgen.geometry.pointmaps import (
    LATENT_SCALE,
    LATENT_SHIFT,
    PointmapNormalization,
    denormalize_latents,
    world_pointmaps,
)
from fourdgen.geometry.postopt import One4DPostOpt, PostOpt
from fourdgen.geometry.projection import rebase_cameras
from fourdgen.media import log_video
from fourdgen.metrics.camera import camera_metrics
from fourdgen.metrics.depth import depth_metrics
from fourdgen.nn.coupling import LatentCoupling
from fourdgen.nn.wan_fusion import WidthFusion
from fourdgen.stages.common import step_generator
from fourdgen.stages.dit import DiTFinetune


class VideoDiffusion(DiTFinetune):
    """RGB+XYZ video diffusion on a Wan DiT.

    Args (besides :class:`~fourdgen.stages.dit.DiTFinetune`'s model, adapter, optimizer and
    sampling ones; 4DNeX: LoRA 64/32 on the attention projections, lr 2e-5, uniform timesteps,
    50 sampling steps, CFG 5.0):
        coupling: how RGB and XYZ share the DiT (4DNeX: :class:`WidthFusion`; One4D:
            ``DecoupledLoRAControl``, which brings its own adapter).
        conditioning: extra input channels (4DNeX: :class:`GuidedFirstFrame`; One4D: ``MaskedFrames``).
        latent_shift / latent_scale: pointmap-latent renormalisation (when encoding on the fly).
        pointmap_norm: how pointmaps reach [-1, 1] (:class:`PointmapNormalization`; 4DNeX: per-frame
            centring, the default; One4D: ``center="global"``, one first-camera frame).
        postopt: post-optimisation component (:class:`One4DPostOpt`, the default, or 4DNeX's
            ``FourDNeXRegistration``).
        val_postopt_steps: post-optimisation steps at validation (twice that at prediction) for a
            component that does not fix its own.
        val_depth_align: per-sequence depth alignment at validation: ``"median"`` (one scale) or
            ``"scale_shift"`` (least squares).
        sampler: ``"euler"`` or ``"unipc"`` (4DNeX's official inference: the Wan2.1 checkpoint's
            UniPC scheduler, flow shift ``sample_shift``); see ``diffusion.flow.make_scheduler``.
    """

    def __init__(
        self,
        coupling: LatentCoupling | None = None,
        conditioning: Conditioning | None = None,
        latent_shift: float = LATENT_SHIFT,
        latent_scale: float = LATENT_SCALE,
        val_postopt_steps: int = 100,
        sampler: str = "euler",
        pointmap_norm: PointmapNormalization | None = None,
        postopt: PostOpt | None = None,
        val_depth_align: str = "median",
        **kwargs,
    ):
        if sampler not in SAMPLERS:
            raise ValueError(f"VideoDiffusion: sampler must be one of {SAMPLERS}, got {sampler!r}")
        if val_depth_align not in ("median", "scale_shift"):
            raise ValueError(
                f"VideoDiffusion: val_depth_align must be 'median' or 'scale_shift', got {val_depth_align!r}"
            )
        super().__init__(coupling=coupling or WidthFusion(), **kwargs)
        self.conditioning = build(conditioning) or GuidedFirstFrame()
        self.pointmap_norm = build(pointmap_norm) or PointmapNormalization()
        self.postopt = build(postopt) or One4DPostOpt()
        self.hparams.conditioning = self.conditioning.spec()
        self.hparams.pointmap_norm = self.pointmap_norm.spec()
        self.hparams.postopt = self.postopt.spec()

    def batch_needs(self, loop: str) -> list[tuple[tuple[str, ...], str]]:
        needs = super().batch_needs(loop)
        if loop != "predict":  # prediction generates the pointmaps; training and validation read them
            why = "the pointmaps it learns and scores: scenes with xyz or depth files, or a latent cache"
            needs.append((("xyz", "depth", "xyz_latents"), why))
        return needs

    def input_channels(self, vae) -> int:
        """DiT input channels next to the noisy latents (the conditioning's)."""
        return self.conditioning.channels(vae)

    # ------------------------------------------------------------------------------ latents
    def encode(self, b: GridBatch) -> dict[str, Tensor]:
        """Latents ``rgb``, ``xyz`` ``[B, C, F, h, w]`` (cached ones if they match this VAE), the
        conditioning channels ``cond``, and the clip's pointmap normalisation ``xyz_center [B, T, 3]``
        / ``xyz_scale [B]`` (None when a cache lacks it)."""
        B, V, T, H, W = b.shape
        if V != 1:
            raise ValueError(
                f"VideoDiffusion with {type(self.coupling).__name__}: expected one view, got V={V}"
            )
        rgb_video = b.rgb[:, 0].permute(0, 2, 1, 3, 4)  # [B, 3, T, H, W]
        if b.rgb_latents is not None and b.xyz_latents is not None:
            if b.vae_id and any(v != self.vae_id for v in b.vae_id):
                raise ValueError(
                    f"batch latents come from VAE {b.vae_id}, the model's VAE is {self.vae_id}: "
                    "give the DataModule the model's vae spec (or clear its cache_dir)"
                )
            rgb, xyz = b.rgb_latents[:, 0].float(), b.xyz_latents[:, 0].float()
            center, scale = b.xyz_center, b.xyz_scale
            center = None if center is None else center[:, 0]
            scale = None if scale is None else scale[:, 0]
        else:
            h = self.hparams
            pts = world_pointmaps(b)[:, 0]
            prepared = [prepare_pointmaps(pts[i], b.w2c[i, 0, 0], norm=self.pointmap_norm) for i in range(B)]
            center = torch.stack([n.centers for _, n in prepared])
            scale = torch.stack([n.scale.reshape(()) for _, n in prepared])
            rgb = encode_video(self.vae, rgb_video)
            xyz = encode_pointmaps(
                self.vae, torch.stack([x for x, _ in prepared]), h.latent_shift, h.latent_scale
            )
        return {"rgb": rgb, "xyz": xyz, "cond": self.condition(b), "xyz_center": center, "xyz_scale": scale}

    def condition(self, b: GridBatch) -> Tensor:
        """Conditioning channels ``[B, C_cond, F, h, W']`` from the batch's cached condition latents
        (when they match this VAE and conditioning) or by VAE-encoding the condition video."""
        observed = self.conditioning.observed(b, self.training)
        want = f"{self.vae_id}:{self.conditioning.cache_key}"
        if b.cond_latents is not None and self.conditioning.cache_key is not None:
            if any(c != want for c in b.cond_id):
                raise ValueError(
                    f"GridBatch.cond_latents come from {b.cond_id}, the model needs {want!r}: give the "
                    "DataModule the model's vae and conditioning (or clear its cache_dir)"
                )
            latents = b.cond_latents[:, 0].float()
        else:
            latents = self.conditioning.encode(self.vae, b.rgb[:, 0].permute(0, 2, 1, 3, 4), observed)
        return self.conditioning(latents, self.vae, observed)

    def latent_shape(self, b: GridBatch) -> torch.Size:
        """Shape of the coupled latents the DiT denoises for the batch's clip size."""
        B, _, T, H, W = b.shape
        t, s = scale_factors(self.vae)
        z = torch.empty(B, self.vae.config.z_dim, (T - 1) // t + 1, H // s, W // s, device="meta")
        return self.coupling.fuse(z, z).shape

    def velocity(
        self, x: Tensor, cond: Tensor, timestep: Tensor, text: Tensor, image: Tensor | None
    ) -> Tensor:
        """DiT velocity for noisy coupled latents ``x [B, C, F, h, W]``."""
        self._check_image_tokens(text, image)
        return self.coupling.predict(self.transformer, x, cond, timestep, text, image)

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: GridBatch, batch_idx: int) -> Tensor:
        b = GridBatch.coerce(batch)
        h = self.hparams
        lat = self.encode(b)
        x0 = self.coupling.fuse(lat["rgb"], lat["xyz"])
        # Drawn from (seed, step, rank), not the global RNG: a resumed run draws what it would have.
        g = step_generator(self.global_step, stream=self.global_rank)
        sigma = sample_sigmas(
            x0.shape[0], mode=h.timestep_sampling, shift=h.train_shift, device=x0.device, generator=g
        )
        noise = torch.randn(x0.shape, generator=g).to(x0)
        v = self.velocity(
            add_noise(x0, noise, sigma), lat["cond"], sigma * 1000, self._text(b), b.image_embeds
        )
        loss = flow_loss(v, velocity_target(x0, noise), sigma, h.loss_weighting)
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
        lat: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Coupled latents ``[B, C, F, h, W]`` generated from the batch's conditions (its first frame,
        text and image embeddings; the clip itself is not needed)."""
        h = self.hparams
        cond = self.condition(b) if lat is None else lat["cond"]
        noise = torch.randn(self.latent_shape(b), generator=generator).to(self.device)
        text, image = self._text(b), b.image_embeds
        w = h.guidance_scale if guidance_scale is None else guidance_scale
        uncond = None
        if w != 1.0:
            neg = self._text(b, negative=True)
            uncond = lambda x, t: self.velocity(x, cond, t, neg, image)  # noqa: E731
        return euler_sample(
            lambda x, t: self.velocity(x, cond, t, text, image),
            noise,
            num_steps=num_steps or h.sample_steps,
            shift=h.sample_shift,
            guidance_scale=w,
            uncond_velocity=uncond,
            sampler=h.sampler,
        )

    def decode(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """Coupled latents -> ``rgb [B, T, 3, H, W]`` in [-1, 1], normalised ``xyz [B, T, H, W, 3]``."""
        h = self.hparams
        rgb_lat, xyz_lat = self.coupling.split(latents)
        rgb = decode_video(self.vae, rgb_lat).permute(0, 2, 1, 3, 4)
        xyz = decode_video(self.vae, denormalize_latents(xyz_lat, h.latent_shift, h.latent_scale))
        return rgb, xyz.permute(0, 2, 3, 4, 1)

    def generate(
        self, b: GridBatch, num_steps: int | None = None, postopt_steps: int = 200, seed: int = 0
    ) -> list[dict]:
        """Sample, decode and post-optimise each clip: RGB, pointmaps, cameras, depth."""
        g = torch.Generator().manual_seed(seed)
        rgb, xyz = self.decode(self.sample(b, num_steps=num_steps, generator=g))
        out = []
        for i in range(len(rgb)):
            rec = self.postopt(xyz[i].float(), steps=postopt_steps)
            out.append({"rgb": rgb[i], "xyz": xyz[i], "K": rec.K, "w2c": rec.w2c, "depth": rec.depth})
        return out

    # ---------------------------------------------------------------------------- validation
    def validation_step(self, batch: GridBatch, batch_idx: int) -> None:
        b = GridBatch.coerce(batch)
        h = self.hparams
        lat = self.encode(b)
        x0 = self.coupling.fuse(lat["rgb"], lat["xyz"])
        g = torch.Generator().manual_seed(batch_idx)
        sample = self.sample(b, num_steps=h.val_sample_steps, generator=g, lat=lat)
        B = x0.shape[0]
        self.log("val/latent_mse", ((sample - x0) ** 2).mean(), batch_size=B)
        rgb, xyz = self.decode(sample)
        metrics = []
        for i in range(B):
            pts = xyz[i].float()
            if lat["xyz_center"] is not None:
                # Undo the clip's normalisation (per-frame centres lose the camera drift), so the
                # cameras are scored in the clip's first-camera frame. Predictions without ground
                # truth stay in normalised units.
                pts = pts * lat["xyz_scale"][i] + lat["xyz_center"][i][:, None, None]
            rec = self.postopt(pts, steps=h.val_postopt_steps)
            gt_depth = None if b.depth is None else b.depth[i, 0, :, 0].float()
            gt_w2c = rebase_cameras(b.w2c[i, 0].float(), b.w2c[i, 0, 0].float())
            metrics.append(self._scores(rec, gt_w2c, gt_depth))
        for k in metrics[0]:
            self.log(f"val/{k}", sum(m[k] for m in metrics) / B, batch_size=B)
        if batch_idx == 0:
            log_video(self.loggers, "val/rgb", (rgb[0] + 1) / 2, self.global_step)
            log_video(self.loggers, "val/xyz", (xyz[0].permute(0, 3, 1, 2) + 1) / 2, self.global_step)

    def _scores(self, rec, gt_w2c: Tensor, gt_depth: Tensor | None) -> dict[str, float]:
        """One4D's reconstruction metrics of one clip: ``ate``, ``rpe_t``, ``rpe_r`` (degrees) after a
        sim(3) Umeyama alignment of the camera centres, and (with ground-truth depth ``[T, H, W]``)
        ``abs_rel``, ``delta1`` after one per-sequence alignment (``val_depth_align``). NaN for all
        when post-optimisation diverged."""
        keys = ("ate", "rpe_t", "rpe_r") + (() if gt_depth is None else ("abs_rel", "delta1"))
        if not (torch.isfinite(rec.w2c).all() and torch.isfinite(rec.depth).all()):
            return dict.fromkeys(keys, float("nan"))
        m = camera_metrics(rec.w2c, gt_w2c, with_scale=True)
        if gt_depth is not None:
            align = self.hparams.val_depth_align
            m.update(depth_metrics(rec.depth, gt_depth, gt_depth > 0, align=align, per_image=False))
        return m

    def predict_step(self, batch: GridBatch, batch_idx: int) -> list[dict]:
        b = GridBatch.coerce(batch)
        outs = self.generate(b, postopt_steps=self.hparams.val_postopt_steps * 2, seed=batch_idx)
        for o, scene in zip(outs, b.scene_id or [f"clip{batch_idx}"] * len(outs), strict=False):
            o["scene_id"] = scene
        return outs
