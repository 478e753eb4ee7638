"""Stage 3: fit one dynamic 4D Gaussian scene to a multi-view video (Full-4D section 3.3).

Canonical Gaussians + a HexPlane deformation field, rendered with gsplat (CUDA) or the pure-torch
rasterizer (CPU). A coarse stage trains static Gaussians, the fine stage adds the deformation.
Densification follows gsplat's 3DGS rules under a hard budget (:class:`BudgetStrategy`).
Novel-view regularisers (e.g. flow-matching distillation) plug into ``regularizers``; their path
cameras and renders are :mod:`fourdgen.stages.novel_views`'s.

This module wires components and logs; the math lives in ``fourdgen.gaussians`` (``dynamic``: the
Gaussians at a time, ``bounds``: scene extent and HexPlane box, ``losses``, ``optim``: learning-rate
schedule, ``densify``) and ``fourdgen.metrics``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn

from fourdgen.batch import GridBatch
from fourdgen.data.protocols import (
    CAMERAS_KEY,
    SceneInfo,
    SceneSource,
    camera_record,
    check_datamodule,
)
from fourdgen.errors import ConfigError
from fourdgen.gaussians.bounds import camera_extent, foreground_bounds
from fourdgen.gaussians.container import Gaussians
from fourdgen.gaussians.deformation import DeformationField
from fourdgen.gaussians.densify import BudgetStrategy
from fourdgen.gaussians.dropout import dropped_logits, keep_mask
from fourdgen.gaussians.dynamic import gaussians_at as dynamic_gaussians
from fourdgen.gaussians.initialization import STATIC_KEY, initial_splats
from fourdgen.gaussians.losses import (
    add_hexplane_regularization,
    inverse_depth_l1,
    photometric_loss,
)
from fourdgen.gaussians.optim import LearningRates, group_views
from fourdgen.gaussians.rasterize import ALPHA_MIN, RenderOutput, rasterize
from fourdgen.gaussians.regularizers import NovelViewRegularizer
from fourdgen.geometry.cameras import camera_centers
from fourdgen.media import log_images, log_video
from fourdgen.metrics.image import ImageMetrics, pooled_psnr
from fourdgen.stages.common import (
    BatchContract,
    LateScalars,
    NonFiniteGuard,
    compile_dynamic,
    compile_graphed,
    logs_this_step,
    step_generator,
)
from fourdgen.stages.novel_views import NovelViews


def _frame_terms(rgb: Tensor, target: Tensor, ssim_weight: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, l1, dssim, psnr)`` of one training render ``rgb [1, H, W, 3]`` (gsplat's layout)
    against its frame ``target [1, 3, H, W]`` in [-1, 1] (the batch's)."""
    pred = rgb.permute(0, 3, 1, 2)
    gt = (target + 1) / 2
    photo = photometric_loss([pred], [gt], ssim_weight)
    return photo.loss, photo.l1, photo.dssim, pooled_psnr(pred.detach(), gt)


def _forget_host_copies(module: Gaussian4DFitter, incompatible_keys) -> None:
    """Load-state-dict post hook: the host copies of loaded buffers are stale."""
    module._steps, module._moving = None, None


class Gaussian4DFitter(NovelViews, NonFiniteGuard, BatchContract, L.LightningModule):
    """Per-scene 4D Gaussian Splatting.

    Args:
        deformation: the deformation field (default: :class:`DeformationField` with 4DGaussians'
            settings). ``deform=False`` fits a static scene (a baseline).
        densify: densification/pruning strategy with budget (Full-4D: 120k max, prune above 80k,
            opacity 0.015).
        lr: per-group learning rates.
        coarse_steps: steps of static training before the deformation is switched on.
        sh_degree: SH degree of the colours (0 = RGB).
        init_opacity / init_random_points / init_random_depth: initialisation; random points in the
            training cameras' frusta (depth range in scene units) when the scene has no geometry.
        bounds_radius / bounds_quantile: the HexPlane box spans the ``[q, 1 - q]`` quantiles (padded
            10%) of the initial points within ``bounds_radius`` x (mean camera distance) of the
            cameras' focus point (:func:`~fourdgen.gaussians.bounds.foreground_bounds`).
        ssim_weight: lambda of (1 - lambda) L1 + lambda (1 - SSIM).
        depth_weight: weight of an inverse-depth L1 between the rendered expected depth and the
            batch's depth (:func:`~fourdgen.gaussians.losses.inverse_depth_l1`; needs depth in the
            training batches, e.g. ``data.train_depth: true``). Not in Full-4D, where FMD
            regularises the views between the cameras: with few cameras and no prior, the geometry
            between them is otherwise free (issue 17). 0 turns it off.
        gaussian_dropout: DropGaussian's rate (:mod:`~fourdgen.gaussians.dropout`): the share of
            Gaussians left out of each training step's renders, the others' opacity raised to
            keep the expected coverage; for sparse cameras (not in Full-4D). 0 turns it off.
        tv_weight / time_smooth_weight / time_l1_weight: HexPlane regularisers (fine stage).
        regularizers: novel-view losses (e.g. :class:`~fourdgen.gaussians.fmd.FlowMatchingDistillation`);
            at the steps one is due (its ``start_step``/``every``, on multiples of ``regularize_every``)
            a camera of the interpolated path (``path_samples`` cameras, Full-4D: 120), drawn from
            the step, renders the whole clip for them (or, when each asks for ``frames``, the most
            frames any of them asks for, drawn from the step too).
        temporal_opacity: each Gaussian fades in time around the time of the frame its initial
            point came from (:mod:`~fourdgen.gaussians.temporal`; needs ``SceneInfo.point_times``,
            e.g. ``data.init_frames: all``), with a learned centre and width starting at
            ``temporal_width`` frame spacings. Not in Full-4D (4DGaussians' field alone): an
            option because large motion is hard to learn through the field alone (issue 17).
            Gaussians of points the scene classified static (``SceneInfo.point_static``, e.g.
            ``data.split_static``) neither fade nor deform.
        relative_deformation: with ``temporal_opacity``, a Gaussian's offsets at ``t`` are the
            field's at ``t`` minus the field's at its own time centre: it sits where its point was
            at that time, and the field carries it from there. Without it, Gaussians born at
            different frames at one place share one offset at every time: the field hardly moves
            them (0.005 scene units a frame on the quickstart, its objects 0.31) and the fades
            explain the frames, a cross-fade between them (issue 17, seventh pass).
        background: RGB in [0, 1] composited under the splats.
        random_background: training renders composite over a random colour per step instead (the
            ground truth is opaque, so any see-through pixel costs: the scene cannot hide holes in
            a colour that happens to match; validation and exports keep ``background``).
        lpips_net / lpips_weights / lpips_allow_random_backbone: LPIPS for val/test metrics
            (``lpips_net=None`` skips LPIPS).
        backend: rasterizer backend ("auto": gsplat on CUDA, torch on CPU).
        rasterize_mode: gsplat's ``classic`` (3DGS) or ``antialiased`` (Mip-Splatting's 2-D filter:
            opacities scaled so that the 0.3 px dilation keeps each splat's weight; for views at other
            distances or grazing angles than the training ones). Exported PLYs hold the raw
            opacities, as Mip-Splatting's do.
        compile: ``torch.compile`` the deformation field, its regularisers and the training
            frames' photometric loss on CUDA (each is many small kernels: compiling fuses them, see
            ``benchmarks/fit_speed.py``).
        on_nonfinite: a NaN/inf loss term or gradient: ``stop`` (raise, naming the step and the
            term) or ``skip`` the batch (warned and counted; one process only). See
            :class:`~fourdgen.stages.common.NonFiniteGuard`.
    """

    def __init__(
        self,
        deformation: DeformationField | None = None,
        deform: bool = True,
        densify: BudgetStrategy | None = None,
        lr: LearningRates | None = None,
        coarse_steps: int = 3000,
        sh_degree: int = 0,
        init_opacity: float = 0.1,
        init_random_points: int = 10_000,
        init_random_depth: tuple[float, float] = (1.0, 10.0),
        bounds_radius: float = 0.75,
        bounds_quantile: float = 0.01,
        ssim_weight: float = 0.2,
        depth_weight: float = 0.0,
        gaussian_dropout: float = 0.0,
        tv_weight: float = 2e-4,
        time_smooth_weight: float = 1e-3,
        time_l1_weight: float = 1e-4,
        regularizers: list[NovelViewRegularizer] | None = None,
        regularize_every: int = 1,
        path_samples: int = 120,
        temporal_opacity: bool = False,
        temporal_width: float = 1.0,
        relative_deformation: bool = False,
        background: tuple[float, float, float] = (0.0, 0.0, 0.0),
        random_background: bool = False,
        lpips_net: str | None = "alex",
        lpips_weights: str | None = None,
        lpips_allow_random_backbone: bool = False,
        backend: str = "auto",
        rasterize_mode: Literal["classic", "antialiased"] = "classic",
        log_images_every_n_val: int = 1,
        compile: bool = False,
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ):
        super().__init__()
        if relative_deformation and not temporal_opacity:
            raise ConfigError(
                "model.relative_deformation: true counts each Gaussian's offsets from its own time, "
                "which only model.temporal_opacity: true gives Gaussians; turn that on, or this off"
            )
        # Checkpoints hold plain dicts (Lightning loads them with weights_only=True); rebuild from them.
        if isinstance(deformation, dict):
            deformation = DeformationField(**deformation)
        self.deformation = (deformation or DeformationField()) if deform else None
        self.densify = BudgetStrategy(**densify) if isinstance(densify, dict) else densify or BudgetStrategy()
        self.lr = LearningRates(**lr) if isinstance(lr, dict) else lr or LearningRates()
        # No explicit dict: under LightningCLI this records the config as given (with its class_path),
        # which `fourdgen validate/test/predict --ckpt_path` parse back.
        self.save_hyperparameters(ignore=["deformation", "regularizers", "densify", "lr"])
        self.hparams.update(
            densify=asdict(self.densify),
            lr=asdict(self.lr),
            deformation=None if self.deformation is None else self.deformation.config,
        )
        self.splats = nn.ParameterDict()
        # Plain list, not a ModuleList: frozen models inside regularisers stay out of checkpoints.
        self._regularizers = list(regularizers or [])
        self.metrics = ImageMetrics(
            lpips_net, lpips_weights, allow_random_backbone=lpips_allow_random_backbone
        )
        self.register_buffer("bg", torch.tensor(background, dtype=torch.float32))
        self.register_buffer("scene_scale", torch.tensor(1.0))
        # Steps this scene was trained for, kept in the state dict: validate/test/predict/export on a
        # loaded checkpoint run with global_step 0 and must still know the coarse/fine stage.
        self.register_buffer("trained_steps", torch.tensor(0, dtype=torch.long))
        self.strategy_state: dict = {}
        self.info: SceneInfo | None = None
        self._render_infos: list[dict] = []
        self._val_seen = 0
        self._compiled: dict = {}  # plain dict: compiled callables stay out of modules and checkpoints
        # Host-side copies of device state the step reads every render: reading the CUDA buffer
        # (``int(trained_steps)``) or the moving Gaussians' index (``nonzero``) is a host sync, and
        # the fit's step is launch-bound (issue 21, P3). Reset whenever a state dict is loaded.
        self._steps: int | None = 0
        self._moving: tuple[Tensor, Tensor] | None = None  # (the static flags it was built from, index)
        self.register_load_state_dict_post_hook(_forget_host_copies)

    # ------------------------------------------------------------------ set-up and checkpoints
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        check_datamodule(dm, SceneSource, "Gaussian4DFitter (e.g. with SceneFramesDataModule)")
        self.info = dm.scene_info()
        if not self.info.cameras_known:
            warnings.warn(
                "the scene's cameras are 'unknown' (placeholders, e.g. a 4Real-Video-V2 grid): the fit "
                "assumes them; estimate cameras first (e.g. the stage-2 reconstructor's) for a real scene",
                stacklevel=2,
            )
        if len(self.splats) == 0:
            self._init_splats(self.info)
        self._setup_regularizers(dm)

    def _init_splats(self, info: SceneInfo) -> None:
        h = self.hparams
        init, points = initial_splats(
            info,
            h.sh_degree,
            h.init_opacity,
            temporal_opacity=h.temporal_opacity,
            temporal_width=h.temporal_width,
            random_points=h.init_random_points,
            random_depth=h.init_random_depth,
        )
        for k, v in init.items():
            self.splats[k] = nn.Parameter(v.detach().clone(), requires_grad=k != STATIC_KEY)
        n, budget = len(self.splats["means"]), self.densify.max_gaussians
        if n > budget:  # measured: a 6-camera GPU fit lost its background this way (RESULTS, issue 17)
            warnings.warn(
                f"model.densify.max_gaussians ({budget}) is below the {n} initial Gaussians (data."
                "init_points, or init_random_points without scene geometry): densification cannot add "
                "any, and opacity resets (densify.reset_every) leave nothing to regrow from; raise "
                "max_gaussians or lower init_points",
                stacklevel=2,
            )
        rig = info.w2c[info.train_views, 0]
        self.scene_scale.fill_(float(camera_extent(rig)))
        if self.deformation is not None:  # the foreground the cameras look at, not a far background
            lo, hi = foreground_bounds(points, rig, radius=h.bounds_radius, quantile=h.bounds_quantile)
            self.deformation.set_bounds(lo, hi)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # the pending finite check first
        checkpoint["fourdgen_strategy_state"] = {k: v for k, v in self.strategy_state.items()}
        if self.info is not None:  # `fourdgen view` shows the checkpoint without its data folder
            checkpoint[CAMERAS_KEY] = camera_record(self.info)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The number of Gaussians changes during training: size the parameters like the checkpoint's
        # before Lightning loads the state dict (the optimizer is built afterwards, so it matches).
        sd = checkpoint["state_dict"]
        sd.setdefault("trained_steps", torch.tensor(int(checkpoint.get("global_step", 0))))  # older files
        for key, value in sd.items():
            if key.startswith("splats."):
                k = key.removeprefix("splats.")
                self.splats[k] = nn.Parameter(
                    torch.empty_like(value, device=self.device), requires_grad=k != STATIC_KEY
                )
        self.strategy_state = dict(checkpoint.get("fourdgen_strategy_state", {}))

    # ------------------------------------------------------------------------------ rendering
    @property
    def is_fine(self) -> bool:
        """Whether the deformation field is on: from the model's own step count, not the trainer's."""
        if self.deformation is None:
            return False
        if self._steps is None:
            self._steps = int(self.trained_steps)
        return self._steps >= self.hparams.coarse_steps

    def weights_source(self) -> str | None:
        """None until the scene has been fitted (a checkpoint brings the fitted Gaussians)."""
        return f"{int(self.trained_steps)} fitted steps" if int(self.trained_steps) > 0 else None

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)  # the batch contract
        self._set_trained_steps(self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._set_trained_steps(self.global_step)

    def _set_trained_steps(self, step: int) -> None:
        self._steps = step
        self.trained_steps.fill_(step)  # a kernel, not a sync

    def _moving_index(self) -> Tensor:
        """Indices ``[M]`` of the Gaussians that are not static. Cached: densification and pruning
        replace the flags' Parameter (gsplat's ops build new ones) and ``.to`` moves it, either of
        which renews the cache."""
        flags = self.splats[STATIC_KEY]
        if self._moving is None or self._moving[0] is not flags or self._moving[1].device != flags.device:
            self._moving = (flags, (flags <= 0.5).nonzero()[:, 0])
        return self._moving[1]

    def gaussians_at(self, t: float | Tensor, deform: bool | None = None) -> dict[str, Tensor]:
        """Gaussians (gsplat-trainer form: log-scales, logits) at normalised time ``t``
        (:func:`~fourdgen.gaussians.dynamic.gaussians_at`; deformed in the fine stage)."""
        deform = self.is_fine if deform is None else deform
        field = self._deform_fn("forward") if deform and self.deformation is not None else None
        moving = self._moving_index() if field is not None and STATIC_KEY in self.splats else None
        relative = bool(self.hparams.get("relative_deformation"))  # .get: older checkpoints
        return dynamic_gaussians(self.splats, t, field, moving, relative)

    def _deform_fn(self, name: str):
        """The deformation field's ``forward``/``regularization``, compiled on CUDA if asked."""
        fn = getattr(self.deformation, name)
        if not (self.hparams.compile and self.device.type == "cuda"):
            return fn
        if name not in self._compiled:
            # the regularisers read only the field's planes: fixed shapes, CUDA-graphed
            self._compiled[name] = compile_graphed(fn) if name == "regularization" else compile_dynamic(fn)
        return self._compiled[name]

    def _frame_terms_fn(self):
        """:func:`_frame_terms`, compiled on CUDA if asked: torchmetrics' SSIM and the L1 are about
        400 operator calls forward and backward, the largest share of the launch-bound step's
        (issue 21, P3); compiled, a few fused kernels and the window's convolution. The frames of a
        scene have one size, so the shapes are static."""
        if not (self.hparams.compile and self.device.type == "cuda"):
            return _frame_terms
        if "frame_terms" not in self._compiled:
            self._compiled["frame_terms"] = torch.compile(_frame_terms, dynamic=False)
        return self._compiled["frame_terms"]

    def render(
        self,
        t: float | Tensor,
        K: Tensor,
        w2c: Tensor,
        deform: bool | None = None,
        background: Tensor | None = None,
        keep: Tensor | None = None,
    ) -> RenderOutput:
        """Render at time ``t`` into cameras ``K [C, 3, 3]``, ``w2c [C, 4, 4]`` at the scene size;
        ``keep [N]``: DropGaussian's mask (training renders)."""
        info = self.info
        g = self.gaussians_at(t, deform)
        if keep is not None:
            g["opacities"] = dropped_logits(g["opacities"], keep, self.hparams.get("gaussian_dropout", 0.0))
        return rasterize(
            g,
            K,
            w2c,
            info.width,
            info.height,
            backend=self.hparams.backend,
            background=self.bg if background is None else background,
            rasterize_mode=self.hparams.get("rasterize_mode", "classic"),  # .get: older checkpoints
        )

    def export_gaussians(self, t: float) -> Gaussians:
        """Detached Gaussians at time ``t`` (for PLY export)."""
        with torch.no_grad():
            g = self.gaussians_at(t, deform=self.deformation is not None)
            if "t_mean" in self.splats:  # faded out at t: invisible (alpha < 1/255 everywhere), drop
                g = {k: v[torch.sigmoid(g["opacities"]) >= ALPHA_MIN] for k, v in g.items()}
            return Gaussians(
                means=g["means"],
                log_scales=g["scales"],
                quats=g["quats"],
                opacity_logits=g["opacities"],
                sh0=g["sh0"],
                shN=g["shN"],
            ).detach()

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: GridBatch, batch_idx: int) -> Tensor:
        batch = GridBatch.coerce(batch)
        h = self.hparams
        self._render_infos = []
        B = batch.rgb.shape[0]
        terms, depths = [], []
        # Drawn from the step (not the global RNG): the data order and a resumed fit are unaffected.
        bg = (
            torch.rand(3, generator=step_generator(self.global_step, 1)).to(self.bg)
            if h.random_background
            else None
        )
        rate = h.get("gaussian_dropout", 0.0)  # .get: checkpoints from before the option
        keep = None
        if rate > 0:
            n = len(self.splats["means"])
            keep = keep_mask(n, rate, step_generator(self.global_step, 2), self.device)
        for i in range(B):  # frames of one batch can have different times: one render each
            out = self.render(
                batch.times[i, 0], batch.K[i, :1], batch.w2c[i, 0, :1], background=bg, keep=keep
            )
            self._render_infos.append(out.info)
            terms.append(self._frame_terms_fn()(out.rgb[:1], batch.rgb[i, 0, :1], h.ssim_weight))
            depths.append(out.depth[0, ..., 0])
        # the frames' mean (the loss is linear in each frame's L1 and SSIM)
        mean = terms[0] if B == 1 else [torch.stack(x).mean() for x in zip(*terms, strict=True)]
        loss, l1, dssim, psnr = mean
        losses = {"l1": l1, "dssim": dssim}
        if h.get("depth_weight", 0.0) > 0:
            if batch.depth is None:
                dm = getattr(self.trainer, "datamodule", None)
                raise ConfigError(
                    f"model.depth_weight: {h.depth_weight} needs depth in the training batches, and "
                    f"{'the training data' if dm is None else type(dm).__name__} gave none "
                    "(SceneFramesDataModule: data.train_depth: true)"
                )
            losses["depth"] = inverse_depth_l1(depths, [batch.depth[i, 0, 0, 0] for i in range(B)])
            loss = loss + h.depth_weight * losses["depth"]
        if self.is_fine:
            reg = self._deform_fn("regularization")()
            loss = add_hexplane_regularization(loss, reg, h.tv_weight, h.time_smooth_weight, h.time_l1_weight)
            losses.update({f"reg_{k}": v for k, v in reg.items()})
        loss = self._add_regularization(batch, loss, losses)
        if not self.losses_finite({f"train/{k}": v for k, v in {**losses, "loss": loss}.items()}):
            self._render_infos = []  # no backward: densification sees nothing of this batch
            return None
        for info in self._render_infos:
            self.densify.step_pre_backward(self.splats, {}, self.strategy_state, self.global_step, info)
        # Logged only on the steps the logger writes (each call costs host time), with each term's
        # latest value: a regulariser due every k steps shows up even when its steps miss those.
        latest = self.__dict__.setdefault("_latest_terms", {})
        latest.update({k: v.detach() for k, v in losses.items()})
        if logs_this_step(self):
            self.log_dict({f"train/{k}": v for k, v in latest.items()}, batch_size=B)
            # the bar's loss is a step late: a CUDA value there is a host sync every step (LateScalars)
            self.log("train/loss", loss, batch_size=B)
            late = self.__dict__.setdefault("_late", LateScalars())
            self.log("loss", late("loss", loss), prog_bar=True, logger=False, batch_size=B)
            # a CPU tensor: Lightning turns a Python number into a CUDA tensor, a host sync each step
            n = torch.tensor(float(len(self.splats["means"])))
            self.log("train/num_gaussians", n, prog_bar=True, batch_size=B)
            self.log("train/psnr", psnr, batch_size=B)
        return loss

    def on_after_backward(self) -> None:
        """Densify/prune after the gradients exist and before the optimizer steps (gsplat's order)."""
        if not self._render_infos:
            return
        if not self.strategy_state:
            self.strategy_state = self.densify.initialize_state(scene_scale=float(self.scene_scale))
        if "scene_center" not in self.strategy_state and self.info is not None:  # also resumed older fits
            rig = self.info.w2c[self.info.train_views, 0]
            # a tuple: gsplat's ops index every tensor of the state by Gaussian
            self.strategy_state["scene_center"] = tuple(camera_centers(rig).mean(0).tolist())
        opt = self.optimizers(use_pl_optimizer=False)
        views = group_views(opt, list(self.splats.keys()))
        for info in self._render_infos[:-1]:  # extra renders of this step only add statistics
            self.densify.accumulate(self.splats, self.strategy_state, info)
        self.densify.step_post_backward(
            self.splats, views, self.strategy_state, self.global_step, self._render_infos[-1]
        )
        self._render_infos = []

    def configure_optimizers(self):
        lr, scale = self.lr, float(self.scene_scale)
        trained = [(k, p) for k, p in self.splats.items() if p.requires_grad]  # not the static flags
        groups = [{"params": [p], "name": k, "lr": lr.initial(k, scale)} for k, p in trained]
        if self.deformation is not None:
            grid = list(self.deformation.grid.parameters())
            grid_ids = {id(p) for p in grid}
            mlp = [p for p in self.deformation.parameters() if id(p) not in grid_ids]
            groups += [
                {"params": mlp, "name": "deformation", "lr": lr.initial("deformation", scale)},
                {"params": grid, "name": "grid", "lr": lr.initial("grid", scale)},
            ]
        # fused: a kernel per group (the for-each path launches per tensor), and the non-finite
        # check needs no host sync (the fused step skips itself on its flag, NonFiniteGuard)
        opt = torch.optim.Adam(groups, lr=0.0, eps=1e-15, fused=True)
        # the deformation field's rates decay from the start of the fine stage
        factors = [lr.factor(g["name"], fine_start=self.hparams.coarse_steps) for g in groups]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factors)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----------------------------------------------------------------------- validation / test
    def _eval_batch(self, batch: GridBatch, prefix: str, log: bool = True) -> dict[str, Tensor]:
        batch = GridBatch.coerce(batch)
        preds = []
        for i in range(batch.rgb.shape[0]):
            out = self.render(
                batch.times[i, 0],
                batch.K[i, :1],
                batch.w2c[i, 0, :1],
            )
            preds.append(out.rgb[0].permute(2, 0, 1))
        pred, gt = torch.stack(preds).clamp(0, 1), (batch.rgb[:, 0, 0] + 1) / 2
        metrics = self.metrics(pred, gt)
        if batch.mask is not None:  # PSNR on moving objects only (masks: object ids > 0)
            m = (batch.mask[:, 0, 0] > 0).expand_as(gt)
            if m.any():
                metrics["psnr_dynamic"] = pooled_psnr(pred, gt, mask=m)
        if log:
            self.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()}, batch_size=len(pred))
        return {"pred": pred, "gt": gt, **metrics}

    def validation_step(self, batch: GridBatch, batch_idx: int) -> None:
        out = self._eval_batch(batch, "val")
        every = self.hparams.log_images_every_n_val
        if batch_idx == 0 and every > 0 and self._val_seen % every == 0:
            log_images(
                self.loggers,
                "val/render_vs_gt",
                torch.cat([out["pred"][:4], out["gt"][:4]]),
                self.global_step,
                max_images=8,
                nrow=min(4, len(out["pred"])),
            )
            log_video(self.loggers, "val/render", out["pred"], self.global_step, fps=self.info.fps)

    def on_validation_epoch_end(self) -> None:
        self._val_seen += 1

    def test_step(self, batch: GridBatch, batch_idx: int) -> None:
        self._eval_batch(batch, "test")

    def predict_step(self, batch: GridBatch, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_batch(batch, "predict", log=False)
