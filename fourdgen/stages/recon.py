"""Stage 2: feed-forward Gaussian reconstruction (4Real-Video-V2, section 3.2).

A grid of V views x T timesteps goes in without cameras; the model
(:class:`~fourdgen.models.gaussian_recon.GaussianReconstructor`) predicts the cameras and one Gaussian
per pixel of every source frame, per timestep, in the frame of the first source camera. Training
renders held-out target views with target cameras that VGGT predicts from the first source frame
plus the targets (the Gaussians' frame), and minimises MSE + lambda * LPIPS.

Training stages (the paper's): ``"static"``, static multi-view scenes with the backbone frozen and
only the Gaussian head trained; ``"dynamic"``, dynamic grids (static scenes copied over time mixed
in by the DataModule) training the temporal attention and the Gaussian head.
"""

from __future__ import annotations

import os
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from fourdgen.backbones.vggt import PRESETS
from fourdgen.batch import GridBatch
from fourdgen.gaussians.rasterize import rasterize
from fourdgen.media import log_images
from fourdgen.metrics.image import LPIPS, ImageMetrics
from fourdgen.models.gaussian_recon import GaussianReconstructor, ReconPrediction, shard_reconstructor
from fourdgen.stages.common import BatchContract, NonFiniteGuard, adamw_with_warmup, fsdp_mesh

DEFAULT_TRAIN_MODULES = {
    "static": ["gaussian_head"],
    "dynamic": ["gaussian_head", "vggt.aggregator.temporal_blocks"],
}


def fit_to_patches(rgb: Tensor, patch: int, max_width: int | None = None) -> Tensor:
    """Resize frames ``[..., 3, H, W]`` so both sides are multiples of ``patch`` (VGGT's input),
    keeping the aspect ratio; ``max_width`` caps the width first (VGGT's 518). No-op when they
    already are and the width fits."""
    H, W = rgb.shape[-2:]
    scale = min(1.0, max_width / W) if max_width else 1.0
    h, w = max(patch, round(H * scale / patch) * patch), max(patch, round(W * scale / patch) * patch)
    if (h, w) == (H, W):
        return rgb
    flat = rgb.reshape(-1, *rgb.shape[-3:]).float()
    out = F.interpolate(flat, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return out.reshape(*rgb.shape[:-2], h, w).to(rgb.dtype)


class FeedForwardReconstruction(NonFiniteGuard, BatchContract, L.LightningModule):
    """Feed-forward 4D Gaussian reconstructor (stage 2).

    Args:
        preset: VGGT size, ``"1b"`` (official VGGT-1B) or ``"tiny"`` (CPU tests).
        vggt_checkpoint: official VGGT ``model.pt`` / ``model.safetensors`` (or its folder), loaded
            at the start of ``fit`` with every key used; None keeps random weights.
        init_checkpoint: a Lightning checkpoint of this module (e.g. the static stage) whose weights
            start ``fit`` (no optimizer state); temporal blocks may be missing from it.
        training_stage: ``"static"`` or ``"dynamic"``; picks the default ``train_modules``.
        train_modules: sub-modules of the reconstructor that train (names under ``model``), e.g.
            ``["gaussian_head"]``; everything else is frozen.
        temporal / camera_token_replacement: 4Real-Video-V2's additions (ablations switch them off).
        num_source_views / num_target_views: views per clip fed to the model / rendered for the
            loss (training samples them at random; validation uses the first ones in order).
        max_width: frames are resized to multiples of the patch size, at most this wide.
        lpips_weight: lambda of the LPIPS term; ``lpips_loss_net`` its backbone (``"vgg"``), with
            ``lpips_loss_weights`` the local backbone weights.
        lpips_net / lpips_weights: LPIPS metric of validation and test (None skips it);
            ``lpips_allow_random_backbone``: accept random LPIPS backbones (tests only).
        lr / weight_decay / warmup_steps: AdamW with linear warm-up.
        background: RGB in [0, 1] under the splats. backend: rasterizer backend.
        gradient_checkpointing: recompute backbone blocks in backward (dynamic training).
        compile_blocks: ``torch.compile`` each transformer block on CUDA
            (:meth:`~fourdgen.backbones.vggt.VGGT.compile_blocks`): the first batch compiles
            for about a minute; every later one runs faster (``benchmarks/run_all.py``, P4).
        model_overrides: VGGTConfig fields, e.g. ``{"img_size": 224}``.
        on_nonfinite: a NaN/inf loss term or gradient: ``stop`` (raise, naming the step and the
            term) or ``skip`` the batch (warned and counted; one process only). See
            :class:`~fourdgen.stages.common.NonFiniteGuard`.
    """

    config_presets = {"preset": tuple(PRESETS)}  # checked before anything is built (config_checks)

    def __init__(
        self,
        preset: str = "tiny",
        vggt_checkpoint: str | None = None,
        init_checkpoint: str | None = None,
        training_stage: Literal["static", "dynamic"] = "static",
        train_modules: list[str] | None = None,
        temporal: bool = True,
        camera_token_replacement: bool = True,
        num_source_views: int = 2,
        num_target_views: int = 2,
        max_width: int | None = 518,
        lpips_weight: float = 0.5,
        lpips_loss_net: str | None = "vgg",
        lpips_loss_weights: str | None = None,
        lpips_net: str | None = "alex",
        lpips_weights: str | None = None,
        lpips_allow_random_backbone: bool = False,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        background: tuple[float, float, float] = (0.0, 0.0, 0.0),
        backend: str = "auto",
        gradient_checkpointing: bool = False,
        compile_blocks: bool = False,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        log_images_every_n_val: int = 1,
        model_overrides: dict | None = None,
    ):
        super().__init__()
        if training_stage not in DEFAULT_TRAIN_MODULES:
            raise ValueError(f"training_stage={training_stage!r}: expected 'static' or 'dynamic'")
        if num_source_views < 1 or num_target_views < 1:
            raise ValueError("num_source_views and num_target_views must be >= 1")
        self.save_hyperparameters()
        self.model = GaussianReconstructor(
            preset,
            temporal=temporal,
            camera_token_replacement=camera_token_replacement,
            **(model_overrides or {}),
        )
        self.model.vggt.set_gradient_checkpointing(gradient_checkpointing)
        self.train_modules = list(train_modules or DEFAULT_TRAIN_MODULES[training_stage])
        self._freeze_all_but(self.train_modules)
        self.lpips_loss = (
            LPIPS(lpips_loss_net, lpips_loss_weights, allow_random_backbone=lpips_allow_random_backbone)
            if lpips_weight > 0 and lpips_loss_net is not None
            else None
        )
        self.metrics = ImageMetrics(
            lpips_net, lpips_weights, allow_random_backbone=lpips_allow_random_backbone
        )
        self.register_buffer("bg", torch.tensor(background, dtype=torch.float32), persistent=False)
        self._weights_loaded = False
        self._sharded = False
        self._compiled = False
        self._val_seen = 0

    def _freeze_all_but(self, names: list[str]) -> None:
        self.model.requires_grad_(False)
        modules = dict(self.model.named_modules())
        for name in names:
            if name not in modules:
                hint = sorted(n for n in modules if n.count(".") <= 2 and n)[:20]
                raise ValueError(f"train_modules: no sub-module {name!r} in the reconstructor; e.g. {hint}")
            if modules[name] is None:
                raise ValueError(f"train_modules: {name!r} is disabled in this configuration")
            modules[name].requires_grad_(True)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(f"train_modules={names} leaves nothing to train")

    # ------------------------------------------------------------------------------ weights
    def setup(self, stage: str) -> None:
        on_cuda = self.trainer.strategy.root_device.type == "cuda"  # CPU: no gain worth the compile
        if self.hparams.get("compile_blocks") and on_cuda and not self._compiled:
            self.model.vggt.compile_blocks()
            self._compiled = True
        # Before Lightning restores a resumed checkpoint (which then overwrites these weights).
        if stage != "fit" or self._weights_loaded:
            return
        h = self.hparams
        if h.vggt_checkpoint:
            self.model.load_vggt(h.vggt_checkpoint)
        if h.init_checkpoint:
            self.load_init_checkpoint(h.init_checkpoint)
        self._weights_loaded = True

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (``tensor_parallel_size: 1``), shard the
        reconstructor with FSDP2 per block (:func:`shard_reconstructor`). Runs after ``setup``, so
        the VGGT weights are loaded into the full model first."""
        dp = fsdp_mesh(self.device_mesh, type(self).__name__)
        if dp is None or self._sharded:
            return
        shard_reconstructor(self.model, dp)
        self._sharded = True

    def weights_source(self) -> str | None:
        """Where the trained Gaussian head comes from without a checkpoint (None: untrained)."""
        return f"init_checkpoint {self.hparams.init_checkpoint}" if self.hparams.init_checkpoint else None

    def load_init_checkpoint(self, path: str | os.PathLike) -> None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"init_checkpoint {path} does not exist")
        sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("vggt.aggregator.temporal_blocks.")]
        if missing or unexpected:
            raise KeyError(f"init_checkpoint {path}: missing {missing[:8]}, unexpected {unexpected[:8]}")

    # ------------------------------------------------------------------------------ forward
    def prepare(self, batch: GridBatch | dict) -> tuple[GridBatch, Tensor]:
        """-> the batch and its frames ``[B, V, T, 3, H, W]`` in [0, 1] at the model's size."""
        b = GridBatch.coerce(batch)
        rgb = fit_to_patches((b.rgb + 1) / 2, self.model.vggt.config.patch_size, self.hparams.max_width)
        return b, rgb.clamp(0, 1)

    def split_views(self, V: int, train: bool) -> tuple[Tensor, Tensor]:
        """Source and target view indices: random in training, the first ones otherwise."""
        h = self.hparams
        if h.num_source_views + h.num_target_views > V:
            raise ValueError(
                f"num_source_views + num_target_views = {h.num_source_views + h.num_target_views} "
                f"but the batch has {V} views (data.num_views)"
            )
        order = torch.randperm(V) if train else torch.arange(V)
        n_src, n_tgt = h.num_source_views, h.num_target_views
        return order[:n_src], order[n_src : n_src + n_tgt]

    def render(self, pred: ReconPrediction, K: Tensor, w2c: Tensor, hw: tuple[int, int]) -> Tensor:
        """Render every timestep of every clip into cameras ``K [B, C, 3, 3]``, ``w2c [B, C, 4, 4]``
        -> ``[B, C, T, 3, H, W]``."""
        B, T = pred.gaussians["means"].shape[:2]
        H, W = hw
        kw = dict(backend=self.hparams.backend, background=self.bg, render_depth=False)
        clips = []
        for b in range(B):
            frames = [rasterize(pred.at(b, t), K[b], w2c[b], W, H, **kw).rgb for t in range(T)]
            clips.append(torch.stack(frames, dim=1))  # [C, T, H, W, 3]
        return torch.stack(clips).permute(0, 1, 2, 5, 3, 4)

    def reconstruct_and_render(self, rgb: Tensor, train: bool) -> dict[str, Tensor]:
        src, tgt = self.split_views(rgb.shape[1], train)
        pred = self.model(rgb[:, src])
        K, w2c = self.model.target_cameras(rgb[:, src[0], 0], rgb[:, tgt, 0])
        render = self.render(pred, K, w2c, tuple(rgb.shape[-2:]))
        return {"render": render, "target": rgb[:, tgt], "pred": pred}

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: GridBatch, batch_idx: int) -> Tensor:
        b, rgb = self.prepare(batch)
        out = self.reconstruct_and_render(rgb, train=True)
        render, target = out["render"].flatten(0, 2), out["target"].flatten(0, 2)
        mse = F.mse_loss(render, target)
        loss = mse
        logs = {"train/mse": mse, "train/psnr": -10 * torch.log10(mse.detach().clamp_min(1e-10))}
        if self.lpips_loss is not None:
            lp = self.lpips_loss.score(render, target).mean()
            loss = loss + self.hparams.lpips_weight * lp
            logs["train/lpips"] = lp
        terms = {k: v for k, v in logs.items() if k != "train/psnr"}
        if not self.losses_finite({**terms, "train/loss": loss}):
            return None
        self.log_dict({"train/loss": loss, **logs}, prog_bar=True, batch_size=rgb.shape[0])
        return loss

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        return adamw_with_warmup(params, h.lr, h.weight_decay, h.warmup_steps)

    # --------------------------------------------------------------------- validation / test
    @torch.no_grad()
    def _eval(self, batch: GridBatch, prefix: str) -> dict[str, Tensor]:
        _, rgb = self.prepare(batch)
        out = self.reconstruct_and_render(rgb, train=False)
        render = out["render"].flatten(0, 2).clamp(0, 1)
        target = out["target"].flatten(0, 2)
        metrics = self.metrics(render, target)
        self.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()}, batch_size=len(render))
        return {"render": render, "target": target, **metrics}

    def validation_step(self, batch: GridBatch, batch_idx: int) -> None:
        out = self._eval(batch, "val")
        every = self.hparams.log_images_every_n_val
        if batch_idx == 0 and every > 0 and self._val_seen % every == 0:
            n = min(4, len(out["render"]))
            images = torch.cat([out["render"][:n], out["target"][:n]])
            log_images(self.loggers, "val/render_vs_target", images, self.global_step, max_images=8, nrow=n)

    def on_validation_epoch_end(self) -> None:
        self._val_seen += 1

    def test_step(self, batch: GridBatch, batch_idx: int) -> None:
        self._eval(batch, "test")

    @torch.no_grad()
    def predict_step(self, batch: GridBatch, batch_idx: int) -> dict:
        """Reconstruct every view of each clip: cameras, Gaussians per timestep and the inputs (for
        :class:`~fourdgen.callbacks.recon.ReconExport`)."""
        b, rgb = self.prepare(batch)
        pred = self.model(rgb)
        return {"pred": pred, "rgb": rgb, "scene_id": b.scene_id, "times": b.times}
