"""Stage 1: 4D video diffusion on a Wan DiT, LoRA-tuned (4DNeX; One4D and the multi-view recipes
plug in other coupling/conditioning components).

Training: rectified flow on the coupled RGB+XYZ latents (``coupling``), with the conditioning
channels (``conditioning``) concatenated to the noisy latents. Validation samples a clip, logs
RGB/XYZ videos and scores depth (AbsRel, delta1) and cameras (ATE) recovered by post-optimisation
against ground truth. Prediction returns RGB and pointmap videos, cameras, depth and point clouds.

Checkpoints hold only trainable tensors (LoRA + new layers): the frozen base is rebuilt from
``transformer``/``vae`` (a local path, or a seeded preset).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from fourdgen.backbones.wan import build_transformer, build_vae, materialize, shard_transformer
from fourdgen.callbacks.media import log_video
from fourdgen.data.batch import GridBatch
from fourdgen.data.pointmaps import world_pointmaps
from fourdgen.diffusion.conditioning import Conditioning, GuidedFirstFrame
from fourdgen.diffusion.flow import add_noise, euler_sample, flow_loss, sample_sigmas, velocity_target
from fourdgen.diffusion.latents import (
    decode_video,
    encode_pointmaps,
    encode_video,
    prepare_pointmaps,
    scale_factors,
    vae_id,
)
from fourdgen.geometry.pointmaps import LATENT_SCALE, LATENT_SHIFT, denormalize_latents
from fourdgen.geometry.postopt import recover_cameras
from fourdgen.geometry.projection import rebase_cameras
from fourdgen.metrics.camera import camera_metrics
from fourdgen.metrics.depth import depth_metrics
from fourdgen.nn.coupling import Coupling
from fourdgen.nn.lora import ATTN_TARGETS, add_lora, load_lora
from fourdgen.nn.wan_fusion import WidthFusion
from fourdgen.stages.common import check_finite

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VideoDiffusion(L.LightningModule):
    """RGB+XYZ video diffusion on a Wan DiT.

    Args:
        transformer: ``build_transformer`` keywords (``path`` of a local diffusers checkpoint, or
            ``preset`` + ``overrides`` + ``seed``). For presets, ``in_channels`` is set to the latent
            channels plus the conditioning's; for checkpoints it is checked.
        vae: ``build_vae`` keywords (use the same spec in the DataModule's latent cache).
        coupling: how RGB and XYZ share the DiT (4DNeX: :class:`WidthFusion`; One4D:
            ``DecoupledLoRAControl``).
        conditioning: extra input channels (4DNeX: :class:`GuidedFirstFrame`; One4D: ``MaskedFrames``).
        lora_rank / lora_alpha / lora_targets: peft LoRA (4DNeX: 64, 32, attention projections);
            ``lora_rank=0`` trains the whole DiT, or with ``train_modules`` only the parameters whose
            names contain one of those substrings (4Real-Video-V2: ``[attn1.]``, self-attention).
            Ignored when the coupling brings its own adapters (One4D's
            :class:`~fourdgen.nn.decoupled_lora.DecoupledLoRAControl`).
        init_lora: a LoRA export (``fourdgen.nn.lora.save_lora``) to start from (its rank wins).
        lr / weight_decay / warmup_steps: AdamW with linear warm-up (4DNeX: lr 2e-5).
        timestep_sampling / train_shift / loss_weighting: rectified-flow training (4DNeX:
            uniform, 1.0, none).
        latent_shift / latent_scale: pointmap-latent renormalisation (when encoding on the fly).
        sample_steps / guidance_scale / sample_shift: inference (4DNeX: 50 steps, CFG 5.0).
        val_sample_steps / val_postopt_steps: the shorter validation sampling and post-optimisation.
        gradient_checkpointing: recompute DiT blocks in backward (memory for speed).
        base_dtype: dtype of the frozen base weights ("bfloat16" for the real models).
    """

    def __init__(
        self,
        transformer: dict | None = None,
        vae: dict | None = None,
        coupling: Coupling | None = None,
        conditioning: Conditioning | None = None,
        lora_rank: int = 64,
        lora_alpha: float = 32,
        lora_targets: list[str] | None = None,
        init_lora: str | None = None,
        train_modules: list[str] | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        timestep_sampling: str = "uniform",
        train_shift: float = 1.0,
        loss_weighting: str = "none",
        latent_shift: float = LATENT_SHIFT,
        latent_scale: float = LATENT_SCALE,
        sample_steps: int = 50,
        guidance_scale: float = 5.0,
        sample_shift: float = 3.0,
        val_sample_steps: int = 10,
        val_postopt_steps: int = 100,
        gradient_checkpointing: bool = False,
        base_dtype: str = "float32",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["coupling", "conditioning"])
        self.hparams.lora_targets = list(lora_targets or ATTN_TARGETS)
        self.hparams.transformer = dict(transformer or {"preset": "tiny"})
        self.hparams.vae = dict(vae or {"preset": "tiny"})
        self.coupling = coupling or WidthFusion()
        self.conditioning = conditioning or GuidedFirstFrame()
        self.transformer = None
        self.vae = None
        self.vae_id: str | None = None
        self.strict_loading = False  # checkpoints hold the trainable tensors only

    # ------------------------------------------------------------------------- model set-up
    def configure_model(self) -> None:
        """Build (or materialise) the DiT and VAE on this device, install the coupling, add LoRA.

        Under Lightning's ``ModelParallelStrategy`` (``tensor_parallel_size: 1``) the DiT is
        sharded with FSDP2 per block (:func:`shard_transformer`), computing in ``base_dtype``; the
        VAE is small and replicated."""
        if self.transformer is not None:
            return
        h = self.hparams
        dtype = _DTYPES[h.base_dtype]
        mesh = self.device_mesh
        device = self.device if self.device.type != "meta" else torch.device("cpu")
        if mesh is not None and mesh.device_type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        vae = build_vae(**h.vae).to(device).eval().requires_grad_(False)
        spec = dict(h.transformer)
        z_dim = vae.config.z_dim
        want_in = z_dim + self.input_channels(vae)
        if spec.get("path") is None:
            spec["overrides"] = {"in_channels": want_in, "out_channels": z_dim, **spec.get("overrides", {})}
        model = build_transformer(**spec, dtype=dtype)
        if next(model.parameters()).is_meta:
            materialize(model, device, dtype, seed=spec.get("seed", 0))
        if model.config.in_channels != want_in or model.config.out_channels != z_dim:
            raise ValueError(
                f"transformer {spec}: in/out channels {model.config.in_channels}/"
                f"{model.config.out_channels}, expected {want_in}/{z_dim} (VAE z_dim + conditioning)"
            )
        self.coupling.install(model)
        trainable = self.coupling.trainable
        own = getattr(self.coupling, "owns_lora", False)  # the coupling brings its adapters (DLC)
        if own and h.init_lora:
            raise ValueError(
                f"init_lora: {type(self.coupling).__name__} brings its own adapters; load its export "
                "with fourdgen.nn.decoupled_lora.load_dlc instead"
            )
        if own:  # adapters and links are installed (the rest frozen) by the coupling
            pass
        elif h.init_lora:  # an export's adapter (its rank; alpha is baked into B) and extra tensors
            load_lora(model, h.init_lora)
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name or any(k in name for k in trainable))
        elif h.lora_rank > 0:
            add_lora(model, h.lora_rank, h.lora_alpha, tuple(h.lora_targets), keep_trainable=trainable)
        elif h.train_modules:
            keep = tuple(h.train_modules) + tuple(trainable)
            for name, p in model.named_parameters():
                p.requires_grad_(any(k in name for k in keep))
            if not any(p.requires_grad for p in model.parameters()):
                raise ValueError(
                    f"train_modules {h.train_modules}: no DiT parameter name contains any of them"
                )
        if own or h.init_lora or h.lora_rank > 0 or h.train_modules:
            for p in model.parameters():  # LoRA and new layers train in float32
                if p.requires_grad:
                    p.data = p.data.float()
        if h.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if mesh is not None:
            if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
                raise ValueError(
                    "VideoDiffusion shards the DiT with FSDP2 only: set the ModelParallelStrategy's "
                    f"tensor_parallel_size to 1 (got {mesh['tensor_parallel'].size()})"
                )
            dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
            shard_transformer(model, dp, param_dtype=None if dtype == torch.float32 else dtype)
        self.transformer = model.to(device)
        self.vae = vae
        self.vae_id = vae_id(vae)

    def weights_source(self) -> str | None:
        """Where trained weights come from without a checkpoint (None: the adapters are untrained, so
        ``predict`` refuses to run without ``--ckpt_path``)."""
        return f"init_lora {self.hparams.init_lora}" if self.hparams.init_lora else None

    def input_channels(self, vae) -> int:
        """DiT input channels next to the noisy latents (the conditioning's)."""
        return self.conditioning.channels(vae)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

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
            prepared = [prepare_pointmaps(pts[i], b.w2c[i, 0, 0]) for i in range(B)]
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
        cfg = self.transformer.config
        if cfg.image_dim is not None:
            if image is None:
                raise ValueError(
                    f"the DiT takes CLIP image tokens (image_dim={cfg.image_dim}): GridBatch.image_embeds "
                    "is missing; give the DataModule an image_encoder"
                )
            if text.shape[1] != 512:  # Wan's I2V attention splits image|text at the last 512 tokens
                raise ValueError(
                    f"GridBatch.text_embeds: image-conditioned Wan needs 512 text tokens, got {text.shape[1]}"
                )
        return self.coupling.predict(self.transformer, x, cond, timestep, text, image)

    @staticmethod
    def _text(b: GridBatch, negative: bool = False) -> Tensor:
        t = b.neg_text_embeds if negative else b.text_embeds
        if t is None:
            if negative and b.text_embeds is not None:
                return torch.zeros_like(b.text_embeds)
            raise ValueError("GridBatch.text_embeds is required (use a DataModule with a text encoder/cache)")
        return t

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: GridBatch, batch_idx: int) -> Tensor:
        b = GridBatch.coerce(batch)
        h = self.hparams
        lat = self.encode(b)
        x0 = self.coupling.fuse(lat["rgb"], lat["xyz"])
        sigma = sample_sigmas(x0.shape[0], mode=h.timestep_sampling, shift=h.train_shift, device=x0.device)
        noise = torch.randn_like(x0)
        v = self.velocity(
            add_noise(x0, noise, sigma), lat["cond"], sigma * 1000, self._text(b), b.image_embeds
        )
        loss = flow_loss(v, velocity_target(x0, noise), sigma, h.loss_weighting)
        check_finite(loss, "train/loss", self.global_step)
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("VideoDiffusion: nothing to train (lora_rank=0 and a frozen DiT?)")
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warm = max(self.hparams.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

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
            rec = recover_cameras(xyz[i].float(), steps=postopt_steps)
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
            rec = recover_cameras(pts, steps=h.val_postopt_steps)
            if not (torch.isfinite(rec.w2c).all() and torch.isfinite(rec.depth).all()):
                metrics.append({"abs_rel": float("nan"), "delta1": float("nan"), "ate": float("nan")})
                continue
            m = {}
            if b.depth is not None:
                gt = b.depth[i, 0, :, 0].float()
                m.update(depth_metrics(rec.depth, gt, gt > 0, align="median", per_image=False))
            gt_w2c = rebase_cameras(b.w2c[i, 0].float(), b.w2c[i, 0, 0].float())
            m["ate"] = camera_metrics(rec.w2c, gt_w2c)["ate"]
            metrics.append(m)
        for k in metrics[0]:
            self.log(f"val/{k}", sum(m[k] for m in metrics) / B, batch_size=B)
        if batch_idx == 0:
            log_video(self.loggers, "val/rgb", (rgb[0] + 1) / 2, self.global_step)
            log_video(self.loggers, "val/xyz", (xyz[0].permute(0, 3, 1, 2) + 1) / 2, self.global_step)

    def predict_step(self, batch: GridBatch, batch_idx: int) -> list[dict]:
        b = GridBatch.coerce(batch)
        outs = self.generate(b, postopt_steps=self.hparams.val_postopt_steps * 2, seed=batch_idx)
        for o, scene in zip(outs, b.scene_id or [f"clip{batch_idx}"] * len(outs), strict=False):
            o["scene_id"] = scene
        return outs
