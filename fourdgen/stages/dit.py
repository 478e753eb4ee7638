"""The base of the stages that fine-tune a Wan DiT: model set-up, adapter, FSDP2, checkpoints, optimizer.

:class:`~fourdgen.stages.video.VideoDiffusion` (pointmap videos: 4DNeX, One4D) and
:class:`~fourdgen.stages.grid.GridDiffusion` (multi-view grids: 4Real-Video-V2, Full-4D) are
siblings on it; each brings its coupling protocol, its latents, its loss and its sampling.

Checkpoints hold only trainable tensors (adapter + new layers): the frozen base is rebuilt from
``transformer``/``vae`` (a local path, or a seeded preset). The hyper-parameters record the coupling
(and conditioning) as ``class_path`` specs, so a checkpoint says what trained it and rebuilds it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from fourdgen.backbones.wan import (
    build_transformer,
    build_vae,
    load_shards_from_rank0,
    materialize,
    shard_transformer,
)
from fourdgen.components import build
from fourdgen.diffusion.latents import vae_id
from fourdgen.errors import FileFormatError
from fourdgen.nn.adapters import Adapter, default_adapter
from fourdgen.nn.checkpointing import checkpoint_function, compile_options
from fourdgen.nn.coupling import DiTCoupling
from fourdgen.nn.lora import ATTN_TARGETS
from fourdgen.stages.common import (
    BatchContract,
    NonFiniteGuard,
    adamw_with_warmup,
    clip_grad_norm,
    fsdp_mesh,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DiTFinetune(NonFiniteGuard, BatchContract, L.LightningModule):
    """Fine-tuning of a Wan DiT (abstract: subclasses give :meth:`input_channels` and the steps).

    Args:
        transformer: ``build_transformer`` keywords (``path`` of a local diffusers checkpoint, or
            ``preset`` + ``overrides`` + ``seed``). For presets, ``in_channels`` is set to the latent
            channels plus :meth:`input_channels`; for checkpoints it is checked.
        vae: ``build_vae`` keywords (use the same spec in the DataModule's latent cache).
        coupling: how the stage's latents meet the DiT (a :class:`~fourdgen.nn.coupling.DiTCoupling`).
        lora_rank / lora_alpha / lora_targets: peft LoRA; ``lora_rank=0`` trains the whole DiT, or
            with ``train_modules`` only the parameters whose names contain one of those substrings.
            Ignored when the coupling brings its own adapter (One4D's decoupled LoRA).
        init_lora: an adapter export (``LoraExport``'s folder) to start from.
        lr / betas / weight_decay / warmup_steps: AdamW with linear warm-up.
        grad_clip_norm: clip the trainable gradients to this global L2 norm before each optimizer
            step (None: no clipping). Done in the module, so it also holds under FSDP2 (DTensor
            shards), where ``Trainer(gradient_clip_val=...)`` depends on the strategy's plugin.
        timestep_sampling / train_shift / loss_weighting: rectified-flow training.
        sample_steps / guidance_scale / sample_shift: inference; ``val_sample_steps`` at validation.
        gradient_checkpointing: recompute DiT blocks in backward (memory for speed).
        checkpoint_policy: what a checkpointed block recomputes: ``full`` (everything) or
            ``keep_attention`` (the attention kernels' outputs are saved, the rest recomputed: less
            recompute for one ``[B, N, C]`` tensor per attention call; :mod:`fourdgen.nn.checkpointing`).
        compile_blocks: ``torch.compile`` the DiT's blocks (regional compilation: one graph that every
            block shares; with checkpointing, the checkpointed call is what is compiled, see
            :func:`~fourdgen.nn.checkpointing.checkpoint_function`). It fuses each block's norms,
            modulation, RoPE and gates, memory-bound passes over the whole clip's tokens (issue 21,
            P2; ``benchmarks/video_step.py --compile``). ``true`` or a dict of ``torch.compile``
            options (e.g. ``{mode: max-autotune-no-cudagraphs}``). The first step compiles.
        base_dtype: dtype of the frozen base weights ("bfloat16" for the real models).
        on_nonfinite: a NaN/inf loss term or gradient: ``stop`` (raise, naming the step and the
            term) or ``skip`` the batch (warned and counted; one process only). See
            :class:`~fourdgen.stages.common.NonFiniteGuard`.
    """

    wan_vae = True  # clip sizes are checked against the VAE before anything is built (config_checks)

    def __init__(
        self,
        transformer: dict | None = None,
        vae: dict | None = None,
        coupling: DiTCoupling | None = None,
        lora_rank: int = 64,
        lora_alpha: float = 32,
        lora_targets: list[str] | None = None,
        init_lora: str | None = None,
        train_modules: list[str] | None = None,
        lr: float = 2e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        grad_clip_norm: float | None = None,
        timestep_sampling: str = "uniform",
        train_shift: float = 1.0,
        loss_weighting: str = "none",
        sample_steps: int = 50,
        guidance_scale: float = 5.0,
        sample_shift: float = 3.0,
        val_sample_steps: int = 10,
        gradient_checkpointing: bool = False,
        checkpoint_policy: Literal["full", "keep_attention"] = "full",
        compile_blocks: bool | dict[str, Any] = False,
        base_dtype: str = "float32",
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["coupling", "conditioning", "pointmap_norm", "postopt"])
        self.hparams.lora_targets = list(lora_targets or ATTN_TARGETS)
        self.hparams.transformer = dict(transformer or {"preset": "tiny"})
        self.hparams.vae = dict(vae or {"preset": "tiny"})
        self.coupling = build(coupling)  # a spec when rebuilt from a checkpoint's hyper-parameters
        self.hparams.coupling = self.coupling.spec()
        self.adapter: Adapter = self.coupling.adapter or default_adapter(
            lora_rank, lora_alpha, self.hparams.lora_targets, init_lora, train_modules
        )
        self.transformer = None
        self.vae = None
        self.vae_id: str | None = None
        self.strict_loading = False  # checkpoints hold the trainable tensors only

    def input_channels(self, vae) -> int:
        """DiT input channels next to the noisy latents."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- model set-up
    def configure_model(self, meta_base: bool = False) -> None:
        """Build (or materialise) the DiT and VAE on this device, install the coupling, set up the
        adapter. Under Lightning's ``ModelParallelStrategy`` (``tensor_parallel_size: 1``) the DiT is
        sharded with FSDP2 per block (:func:`shard_transformer`), computing in ``base_dtype``; the
        VAE is small and replicated. ``meta_base``: the DiT stays on the meta device (its config only,
        no weights read or allocated), for :meth:`from_checkpoint`."""
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
        dp = fsdp_mesh(mesh, type(self).__name__)
        # Sharded over several ranks, only rank 0 builds the base (reads the checkpoint, or draws a
        # preset's weights): the others build it on the meta device and get their shards from rank 0
        # once it is sharded, so one rank holds the whole model in host memory, not each (14B: 28 GB).
        from_rank0 = dp is not None and dp.size() > 1 and not meta_base
        empty = meta_base or (from_rank0 and torch.distributed.get_rank() != 0)
        model = build_transformer(**spec, dtype=dtype, **({"meta": True} if empty else {}))
        if next(model.parameters()).is_meta and not empty:
            materialize(model, device, dtype, seed=spec.get("seed", 0))
        elif empty and spec.get("path") is None:
            model.to(dtype)  # the dtypes materialize gives rank 0's preset
        if model.config.in_channels != want_in or model.config.out_channels != z_dim:
            raise ValueError(
                f"transformer {spec}: in/out channels {model.config.in_channels}/"
                f"{model.config.out_channels}, expected {want_in}/{z_dim} (VAE z_dim + conditioning)"
            )
        with torch.device("meta") if empty else contextlib.nullcontext():  # new layers beside the base
            self.coupling.install(model)
            self.adapter.setup(model, keep_trainable=self.coupling.trainable, init=h.init_lora)
        compiled = compile_options(h.get("compile_blocks"))  # .get: checkpoints from before the options
        if h.gradient_checkpointing:
            fn = checkpoint_function(h.get("checkpoint_policy", "full"), compile=compiled)
            model.enable_gradient_checkpointing(gradient_checkpointing_func=fn)
        if dp is not None:
            full = model.state_dict() if from_rank0 and not empty else {}  # rank 0's tensors, not copies
            shard_transformer(model, dp, param_dtype=None if dtype == torch.float32 else dtype)
            if from_rank0:
                load_shards_from_rank0(model, full, device)
                del full
        if compiled is not None and not h.gradient_checkpointing and not meta_base:
            model.compile_repeated_blocks(**compiled)  # after sharding: FSDP2's hooks compile with them
        self.transformer = model if meta_base else model.to(device)
        self.vae = vae
        self.vae_id = vae_id(vae)

    @staticmethod
    def from_checkpoint(
        ckpt: dict, where: str | os.PathLike, model_class: type[DiTFinetune] | None = None, **overrides
    ) -> DiTFinetune:
        """The stage a checkpoint trained (``ckpt``: :func:`~fourdgen.checkpoints.read_checkpoint`'s
        dict of ``where``, a file or a sharded folder) with its trained tensors, and the frozen base on
        the meta device: all an adapter export needs, with no base weight read (a 14B base is 28 GB).
        The class is the hyper-parameters' ``_class_path`` (``fourdgen fit`` records it), else
        ``model_class``; ``overrides`` replace hyper-parameters (e.g. ``transformer`` when the
        checkpoint's base path is another machine's: only its config.json is read)."""
        hp = ckpt.get("hyper_parameters")
        if not isinstance(hp, dict):
            raise FileFormatError(where, "hyper_parameters", "the stage's hyper-parameters", "none")
        if model_class is None:
            name = hp.get("_class_path")
            if not isinstance(name, str) or "." not in name:
                raise FileFormatError(
                    where, "hyper_parameters._class_path", "the stage class (fourdgen fit records it)", name
                )
            module, _, attr = name.rpartition(".")
            model_class = getattr(importlib.import_module(module), attr, None)
        if not (isinstance(model_class, type) and issubclass(model_class, DiTFinetune)):
            raise FileFormatError(
                where, "hyper_parameters._class_path", "a DiT stage (e.g. VideoDiffusion)", model_class
            )
        state = ckpt.get("state_dict")
        if not isinstance(state, dict) or not state:
            raise FileFormatError(where, "state_dict", "the trained tensors", "none")
        kwargs = {k: v for k, v in hp.items() if not k.startswith("_")}
        if kwargs.get("init_lora") and any(".lora_A." in k for k in state):
            # The adapter it started from only set the first values: the rank is the tensors', and the
            # loaded export's scale was baked into B (alpha = rank).
            rank = next(v for k, v in state.items() if ".lora_A." in k).shape[0]
            kwargs.update(lora_rank=rank, lora_alpha=rank)
        model = model_class(**{**kwargs, "init_lora": None, **overrides})
        model.configure_model(meta_base=True)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        unknown = sorted(set(state) - trainable)
        if unknown:
            raise FileFormatError(
                where, f"state_dict.{unknown[0]}", f"a trained tensor of {model_class.__name__}", "no such"
            )
        missing = sorted(trainable - set(state))
        if missing:
            raise FileFormatError(where, f"state_dict.{missing[0]}", "the trained tensor", "missing")
        model.load_state_dict(state, strict=False, assign=True)  # the trained tensors replace meta ones
        return model

    def weights_source(self) -> str | None:
        """Where trained weights come from without a checkpoint (None: the adapter is untrained, so
        ``predict`` refuses to run without ``--ckpt_path``)."""
        return f"init_lora {self.hparams.init_lora}" if self.hparams.init_lora else None

    def export_adapter(self, out_dir, write: bool = True) -> bool:
        """Write the trained adapter in diffusers' format (False: nothing to export, the checkpoint
        holds the weights). Every rank calls it under FSDP; only ``write=True`` writes."""
        return self.adapter.export(self.transformer, out_dir, write=write)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The stage's state is what trains (adapter, new layers); the frozen base and the VAE are
        rebuilt from ``transformer``/``vae``. Trimmed here rather than in ``on_save_checkpoint``
        because every checkpoint route reads it: Lightning's single-file save, and
        ``ModelParallelStrategy``'s sharded save *and* load (torch.distributed.checkpoint loads exactly
        the keys ``get_model_state_dict`` names, so a trimmed folder needs a trimmed state dict; else
        resuming fails with "Missing key in checkpoint state_dict: ...scale_shift_table")."""
        before = set(destination) if destination is not None else set()
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        trainable = {prefix + n for n, p in self.named_parameters() if p.requires_grad}
        for key in [k for k in out if k not in before and k not in trainable]:
            del out[key]
        return out

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        return adamw_with_warmup(params, h.lr, h.weight_decay, h.warmup_steps, betas=tuple(h.betas))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """``grad_clip_norm`` (4DNeX: 1.0, its ``max_grad_norm``), then whatever the Trainer asks."""
        if self.hparams.get("grad_clip_norm"):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            norm = clip_grad_norm(params, self.hparams.grad_clip_norm)
            if self._trainer is not None:
                self.log("train/grad_norm", norm.float(), batch_size=1)
        if gradient_clip_val:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------------- shared checks
    def batch_needs(self, loop: str) -> list[tuple[tuple[str, ...], str]]:
        needs = [(("text_embeds",), "the DiT's text conditioning: give the DataModule a text_encoder")]
        image_dim = None if self.transformer is None else self.transformer.config.image_dim
        if image_dim is not None:
            needs.append(
                (
                    ("image_embeds",),
                    f"CLIP image tokens (image_dim={image_dim}): give the DataModule an image_encoder",
                )
            )
        return needs

    def _text(self, b, negative: bool = False) -> Tensor:
        t = b.neg_text_embeds if negative else b.text_embeds
        if t is None:
            if negative and b.text_embeds is not None:
                return torch.zeros_like(b.text_embeds)
            raise ValueError("GridBatch.text_embeds is required (use a DataModule with a text encoder/cache)")
        return t

    def _check_image_tokens(self, text: Tensor, image: Tensor | None) -> None:
        cfg = self.transformer.config
        if cfg.image_dim is None:
            return
        if image is None:
            raise ValueError(
                f"the DiT takes CLIP image tokens (image_dim={cfg.image_dim}): GridBatch.image_embeds "
                "is missing; give the DataModule an image_encoder"
            )
        if text.shape[1] != 512:  # Wan's I2V attention splits image|text at the last 512 tokens
            raise ValueError(
                f"GridBatch.text_embeds: image-conditioned Wan needs 512 text tokens, got {text.shape[1]}"
            )
