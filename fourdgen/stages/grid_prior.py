"""The trained Full-4D grid model as the frozen prior of flow-matching distillation.

:class:`GridPrior` loads a :class:`~fourdgen.stages.grid.GridDiffusion` (ProjectionGrid coupling)
from its Lightning checkpoint, or a LoRA export plus the coupling it was trained with, over the
base Wan from a local path. It runs frozen, in bf16 by default, on its own device if asked; the
4DGS fitter never registers it, so its weights stay out of the fitter's checkpoint.

Each FMD call denoises a two-view grid ``[source video, novel view]``: row 0 is the input video
(noised to the same level, as in training, where every row is noised), row 1 the rendered clip's
noisy latents; the conditions are the source video projected into both cameras and the cameras
relative to the source, normalised over the whole rig of the scene plus the novel camera (the
grid model normalises over the grid it was trained on, so a two-view grid alone would blow every
novel camera up to unit distance).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from fourdgen.backbones.image import CLIPImageEncoder, HashImageEncoder
from fourdgen.backbones.text import HashTextEncoder, UMT5TextEncoder
from fourdgen.batch import GridBatch
from fourdgen.checkpoints import is_sharded_checkpoint, read_checkpoint
from fourdgen.data.embeddings import ConditionEmbedder
from fourdgen.diffusion.flow import add_noise
from fourdgen.diffusion.latents import encode_video, scale_factors
from fourdgen.errors import ConfigError
from fourdgen.gaussians.fmd import VideoPrior
from fourdgen.gaussians.regularizers import SourceClip
from fourdgen.nn.grid_coupling import ProjectionGrid
from fourdgen.nn.grid_layout import grid_to_sequence, sequence_to_grid
from fourdgen.nn.multiview import relative_cameras
from fourdgen.stages.grid import GridDiffusion

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _load_hparams(checkpoint: str) -> tuple[dict, dict]:
    path = Path(checkpoint)
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise ConfigError(
            f"GridPrior.checkpoint: {path} is not a file nor a sharded folder (a GridDiffusion Lightning "
            "checkpoint; FSDP2 runs save folders)"
        )
    try:
        ckpt = read_checkpoint(path)  # a sharded folder: consolidated in memory (the trained tensors)
    except Exception as e:
        raise ConfigError(f"{path}: not a readable Lightning checkpoint ({type(e).__name__}: {e})") from e
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict) or "coupling" not in hp:
        raise ConfigError(
            f"{path}: field 'hyper_parameters' with a 'coupling': expected a GridDiffusion checkpoint"
        )
    return {k: v for k, v in hp.items() if not k.startswith("_")}, ckpt["state_dict"]


class GridPrior(VideoPrior):
    """A frozen Full-4D grid model for :class:`~fourdgen.gaussians.fmd.FlowMatchingDistillation`.

    Args:
        checkpoint: a ``GridDiffusion`` Lightning checkpoint (``last.ckpt``; it holds the trained
            tensors and the hyper-parameters that rebuild the model and its coupling).
        export: instead, a LoRA export folder (``LoraExport``) of a LoRA-tuned grid model; then
            ``coupling`` must say how it was trained.
        transformer / vae: the base Wan (``{"path": local diffusers folder}``, or a preset); they
            replace the checkpoint's (its paths may be another machine's).
        coupling: the ``ProjectionGrid`` of an ``export`` (a checkpoint brings its own).
        text_encoder / image_encoder / prompt_suffix / negative_prompt: embed the scene caption
            as the grid model's DataModule did (same encoders and prompts).
        dtype: the prior's weights and compute ("bfloat16" for the real models).
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        export: str | None = None,
        transformer: dict | None = None,
        vae: dict | None = None,
        coupling: ProjectionGrid | None = None,
        text_encoder: HashTextEncoder | UMT5TextEncoder | None = None,
        image_encoder: CLIPImageEncoder | HashImageEncoder | None = None,
        prompt_suffix: str = "",
        negative_prompt: str = "",
        dtype: str = "bfloat16",
    ):
        if (checkpoint is None) == (export is None):
            raise ConfigError("GridPrior: give exactly one of checkpoint (a GridDiffusion .ckpt) or export")
        if dtype not in _DTYPES:
            raise ConfigError(f"GridPrior.dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        self.checkpoint, self.export = checkpoint, export
        self.transformer, self.vae, self.coupling = transformer, vae, coupling
        self.embedder = ConditionEmbedder(text_encoder, image_encoder, prompt_suffix, negative_prompt)
        self.dtype = _DTYPES[dtype]
        self.model: GridDiffusion | None = None

    @classmethod
    def from_module(cls, model: GridDiffusion, **kw) -> GridPrior:
        """A prior over an already built grid model (in-process use, benchmarks); ``kw``: the
        embedding and ``dtype`` arguments of the constructor."""
        prior = cls(checkpoint="<in-process module>", **kw)  # a label: load() is never called
        prior.model = prior._freeze(model)
        return prior

    def _freeze(self, model: GridDiffusion) -> GridDiffusion:
        model.eval().requires_grad_(False)
        model.transformer.to(self.dtype)
        model.vae.to(self.dtype)
        return model

    # ------------------------------------------------------------------------------ loading
    def load(self, device: torch.device | str = "cpu") -> GridDiffusion:
        """Build the grid model on ``device``, frozen, with the trained tensors loaded."""
        state = None
        if self.checkpoint is not None:
            hp, state = _load_hparams(self.checkpoint)
            where = self.checkpoint
        else:
            if not Path(self.export).is_dir():
                raise ConfigError(f"GridPrior.export: {self.export} is not a folder (a LoRA export)")
            if self.coupling is None:
                raise ConfigError("GridPrior: an export needs the coupling it was trained with (coupling:)")
            hp = {"coupling": self.coupling, "init_lora": os.fspath(self.export), "lora_rank": 1}
            where = self.export
        hp.update({k: v for k, v in (("transformer", self.transformer), ("vae", self.vae)) if v is not None})
        hp.update(lpips_net=None, gradient_checkpointing=False)
        model = GridDiffusion(**hp).to(device)
        model.configure_model()  # builds the base on `device`, installs the coupling and adapter
        if not isinstance(model.coupling, ProjectionGrid):
            raise ConfigError(
                f"{where}: coupling {type(model.coupling).__name__}: FMD needs a Full-4D ProjectionGrid "
                "model (it conditions on the source video's projection into the novel camera)"
            )
        if model.coupling.source_view != 0:
            raise ConfigError(
                f"{where}: the model's source_view is {model.coupling.source_view}; FMD's two-view grid "
                "holds the source in row 0 (train the prior with source_view 0)"
            )
        if state is not None:
            result = model.load_state_dict(state, strict=False)
            if result.unexpected_keys:
                raise ConfigError(
                    f"{where}: {len(result.unexpected_keys)} tensors fit no parameter of the rebuilt model "
                    f"(e.g. {result.unexpected_keys[0]}): was it trained with another model or coupling?"
                )
        return self._freeze(model)

    def setup(self, source: SourceClip, device: torch.device) -> None:
        if self.model is None:
            self.model = self.load(device)
        m = self.model
        t_factor = scale_factors(m.vae)[0]
        T, _, H, W = source.rgb.shape
        if (T - 1) % t_factor:
            raise ConfigError(f"GridPrior: the scene has {T} frames; the prior's VAE needs 1 + {t_factor} k")
        self.device = device
        self.t_factor = t_factor
        self.source = source
        rgb = source.rgb.to(device) * 2 - 1
        emb = self.embedder([source.caption], rgb[:1], keys=["source"])
        self.text = emb["text_embeds"].to(device)
        self.neg_text = emb["neg_text_embeds"].to(device)
        self.image = emb.get("image_embeds")
        self.image = None if self.image is None else self.image.to(device)
        self.source_latents = self.encode(source.rgb.to(device)).detach()  # [1, C, F, h, w]
        self.rig = source.rig.to(device) if source.rig is not None else source.w2c[:1].to(device)
        # What does not depend on the novel camera, once: the source depth (a depth model's
        # prediction is costly) and the latents of the source's projection into itself.
        with torch.no_grad():
            b = self.batch(source.K, source.w2c)
            coupling: ProjectionGrid = m.coupling
            self.source_depth = coupling.source_depth(b)  # [1, T, H, W]
            own = coupling.project(b, depth=self.source_depth)[:, :1]
            self.source_cond = m.encode_grid(own)  # [1, 1, C, F, h, w]

    # ----------------------------------------------------------------------------- the prior
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def encode(self, rgb: Tensor) -> Tensor:
        video = (rgb * 2 - 1).permute(1, 0, 2, 3)[None]  # [1, 3, T, H, W]
        return encode_video(self.model.vae, video, grad=True)

    def batch(self, K: Tensor, w2c: Tensor) -> GridBatch:
        """The two-view grid ``[source, novel]`` of one FMD call (the novel row's pixels are unused)."""
        s = self.source
        dev = self.device
        T, _, H, W = s.rgb.shape
        rgb = torch.stack([s.rgb.to(dev) * 2 - 1, torch.zeros(T, 3, H, W, device=dev)])[None]
        depth = None
        if s.depth is not None:
            depth = torch.stack([s.depth.to(dev), torch.zeros(T, H, W, device=dev)])[None, :, :, None]
        return GridBatch(
            rgb=rgb,
            K=torch.stack([s.K.to(dev), K.to(dev)])[None].float(),
            w2c=torch.stack([s.w2c.to(dev), w2c.to(dev)])[None].float(),
            observed=torch.tensor([[[True] * T, [False] * T]], device=dev),
            times=s.times.to(dev)[None],
            view_ids=torch.tensor([[s.view, -1]], device=dev),
            time_ids=torch.arange(T, device=dev)[None],
            depth=depth,
            text_embeds=self.text,
            neg_text_embeds=self.neg_text,
            image_embeds=self.image,
            caption=[s.caption],
            scene_id=["source"],
        )

    def velocity(self, x, sigma, K, w2c, guidance_scale=1.0, generator=None) -> Tensor:
        m = self.model
        b = self.batch(K, w2c)
        src = self.source_latents
        latents = torch.stack([src, x.to(src)], dim=1)  # [1, 2, C, F, h, w]
        coupling: ProjectionGrid = m.coupling

        def encode(pix: Tensor) -> Tensor:  # only the novel view's projection is new
            return torch.cat([self.source_cond, m.encode_grid(pix[:, 1:])], dim=1)

        inp = coupling.prepare(b, latents, encode, self.t_factor, depth=self.source_depth)
        # Cameras relative to the source, normalised over the scene's rig plus the novel camera.
        rig = torch.cat([self.rig, w2c[:1].to(self.rig)])
        cams = torch.cat([b.w2c[0, :1, 0], rig]).float()[None]  # the source first
        inp.camera = relative_cameras(cams, 0)[:, [0, -1]].to(inp.camera)
        noise = torch.randn(src.shape, generator=generator).to(src)
        noisy = grid_to_sequence(torch.stack([add_noise(src, noise, sigma), x.to(src)], dim=1))
        t = sigma.to(src) * 1000
        with self._autocast():
            v = m.velocity(noisy, inp, t, self.text, self.image)
            if guidance_scale != 1.0:
                v_u = m.velocity(noisy, inp, t, self.neg_text, self.image)
                v = v_u + guidance_scale * (v - v_u)
        return sequence_to_grid(v.float(), 2)[:, 1]
