"""RGB + pointmap clips for 4D video diffusion (4DNeX-style), with text and latent caches.

Each sample is one view's clip (V = 1) from a scene folder, with world-space pointmaps (the
scene's ``xyz``, or its depth unprojected). ``prepare_data`` fills the caches under ``cache_dir``:
- ``text/``: embeddings of every caption (+ ``prompt_suffix``) and of the negative prompt;
- ``image/``: CLIP embeddings of each clip's first frame (Wan I2V checkpoints);
- ``latents/``: VAE latents of each clip's RGB, normalised pointmaps and (with ``conditioning``)
  condition video, keyed by the clip (scene, frames, size, content), the VAE's fingerprint and the
  conditioning, so a changed scene, VAE or conditioning is re-encoded.
Without a ``vae`` spec the batch carries pixels only and the stage module encodes them itself.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset, get_worker_info

from fourdgen.backbones.image import CLIPImageEncoder, HashImageEncoder
from fourdgen.backbones.text import HashTextEncoder, UMT5TextEncoder
from fourdgen.backbones.wan import build_vae
from fourdgen.batch import GridBatch
from fourdgen.components import build
from fourdgen.data.datamodules import GridDataModule, GridDataset
from fourdgen.data.embeddings import ConditionEmbedder
from fourdgen.diffusion.conditioning import Conditioning
from fourdgen.diffusion.latents import encode_pointmaps, encode_video, prepare_pointmaps, vae_id
from fourdgen.geometry.pointmaps import (
    LATENT_SCALE,
    LATENT_SHIFT,
    PointmapNormalization,
    latent_stats,
    world_pointmaps,
)
from fourdgen.io import atomic_path, read_cache


class _PointmapClips(Dataset):
    def __init__(self, base: GridDataset, dm: PointmapDataModule):
        self.base, self.dm = base, dm

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int) -> GridBatch:
        b = self.base[idx]
        extra = self.dm.embedder(b.caption, b.rgb[:, 0, 0], b.scene_id)
        cached = self.dm.latents_for(b)
        if cached is not None:
            extra.update(cached)
        for k, v in extra.items():
            setattr(b, k, v)
        return b.validate()


class PointmapDataModule(GridDataModule):
    """One-view RGB + XYZ clips from scene folders (see :class:`GridDataModule` for the split and
    sampling arguments).

    Args:
        cache_dir: where text and latent caches live (None: embed text on every load, no latents).
        vae: VAE spec for the latent cache (``build_vae`` keywords: ``path``/``preset``/``seed``);
            use the stage module's. None: no latent cache.
        text_encoder: :class:`UMT5TextEncoder` (a local Wan checkpoint) or :class:`HashTextEncoder`.
        image_encoder: :class:`CLIPImageEncoder` for checkpoints with ``image_dim`` (Wan2.1-I2V),
            embedding each clip's first frame; None for text-only checkpoints.
        conditioning: the stage module's conditioning component (same settings): its condition
            video's latents are cached too, instead of being VAE-encoded at every step.
        pointmap_norm: the stage module's pointmap normalisation (linked by the CLI; default 4DNeX's
            per-frame centring), applied before the pointmaps are VAE-encoded.
        prompt_suffix: appended to every caption (4DNeX: "POINTMAP_STYLE.").
        negative_prompt: the CFG negative prompt, embedded into ``neg_text_embeds``.
        latent_shift / latent_scale: pointmap-latent renormalisation ``(z + shift) / scale``.
        observe: frames given as conditions in validation/test/predict batches: ``"first"``
            (image-to-4D), ``"all"`` (video-to-4D reconstruction) or a list of frame indices
            (sparse frames). Training conditionings that draw tasks (One4D) ignore it.
        encode_device: where ``prepare_data`` runs the VAE to fill the cache (None: CUDA if
            available). Loader workers only read the cache that ``prepare_data`` filled.
    """

    def __init__(
        self,
        root: str = "data/pointmaps",
        num_frames: int | None = 49,
        height: int | None = 480,
        width: int | None = 720,
        frame_stride: int = 1,
        cache_dir: str | None = None,
        vae: dict | None = None,
        text_encoder: HashTextEncoder | UMT5TextEncoder | None = None,
        image_encoder: CLIPImageEncoder | HashImageEncoder | None = None,
        conditioning: Conditioning | None = None,
        pointmap_norm: PointmapNormalization | None = None,
        prompt_suffix: str = "POINTMAP_STYLE.",
        negative_prompt: str = "",
        latent_shift: float = LATENT_SHIFT,
        latent_scale: float = LATENT_SCALE,
        encode_device: str | None = None,
        observe: str | list[int] = "first",
        crop: str = "center",
        samples_per_scene: int = 1,
        on_bad_sample: Literal["skip", "error"] = "skip",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        synthetic=None,
        num_synthetic_scenes: int = 1,
        batch_size: int = 1,
        num_workers: int = 0,
    ):
        super().__init__(
            root=root,
            num_views=1,
            num_frames=num_frames,
            height=height,
            width=width,
            frame_stride=frame_stride,
            crop=crop,
            # One view: "all" frames given is GridDataset's "first_view".
            condition={"first": "first_frame", "all": "first_view"}.get(observe, observe)
            if isinstance(observe, str)
            else list(observe),
            samples_per_scene=samples_per_scene,
            on_bad_sample=on_bad_sample,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            synthetic=synthetic,
            num_synthetic_scenes=num_synthetic_scenes,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        self.hparams.update(  # encoders and conditioning are objects: kept out of the hparams
            cache_dir=cache_dir,
            vae=None if vae is None else dict(vae),
            prompt_suffix=prompt_suffix,
            negative_prompt=negative_prompt,
            latent_shift=latent_shift,
            latent_scale=latent_scale,
            encode_device=encode_device,
            observe=list(observe) if not isinstance(observe, str) else observe,
        )
        if isinstance(observe, str) and observe not in ("first", "all"):
            raise ValueError(
                f"data.observe: expected 'first', 'all' or a list of frame indices, got {observe!r}"
            )
        self.embedder = ConditionEmbedder(
            text_encoder, image_encoder, prompt_suffix, negative_prompt, cache_dir=cache_dir
        )
        self.conditioning = conditioning
        self.pointmap_norm = build(pointmap_norm) or PointmapNormalization()
        self._vae = None
        self._vae_id: str | None = None

    # ------------------------------------------------------------------------------ caches
    @property
    def _cond_id(self) -> str | None:
        if self.conditioning is None or self.conditioning.cache_key is None:  # e.g. tasks drawn per step
            return None
        return f"{self._vae_id}:{self.conditioning.cache_key}"

    def _vae_ready(self) -> bool:
        if self.hparams.vae is None or self.hparams.cache_dir is None:
            return False
        if self._vae is None:
            self._vae = build_vae(**self.hparams.vae).eval()  # on CPU until something is encoded
            self._vae_id = vae_id(self._vae)
        return True

    def _latent_path(self, b: GridBatch) -> Path:
        h = self.hparams
        key = hashlib.sha1(  # the clip by scene, frames and content; the VAE; the renormalisation
            repr(
                (
                    b.scene_id,
                    b.time_ids.tolist(),
                    tuple(b.rgb.shape),
                    float(b.rgb.double().sum()),
                    self._vae_id,
                    self._cond_id,
                    self.pointmap_norm.cache_key,
                    h.latent_shift,
                    h.latent_scale,
                )
            ).encode()
        ).hexdigest()[:20]
        return Path(h.cache_dir) / "latents" / f"{b.scene_id[0]}-{key}.safetensors"

    def latents_for(self, b: GridBatch) -> dict[str, torch.Tensor] | None:
        """Cached latents of clip ``b`` (encoded and stored on first use); None without a VAE spec."""
        if not self._vae_ready():
            return None
        path = self._latent_path(b)
        keys = ("rgb_latents", "xyz_latents", "xyz_center", "xyz_scale")
        d = read_cache(path, keys + (("cond_latents",) if self._cond_id is not None else ()))
        if d is None:  # not cached yet, or a damaged file (warned): encode and write it
            d = self._encode(b)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(d, str(tmp), metadata={"vae_id": self._vae_id})
        out = {k: v[None, None] for k, v in d.items() if k.endswith("latents")}
        out["xyz_center"], out["xyz_scale"] = d["xyz_center"][None, None], d["xyz_scale"].reshape(1, 1)
        out["vae_id"] = [self._vae_id]
        if self._cond_id is not None:
            out["cond_id"] = [self._cond_id]
        return out

    def _encode(self, b: GridBatch) -> dict[str, torch.Tensor]:
        h = self.hparams
        xyz, norm = prepare_pointmaps(world_pointmaps(b)[0, 0], b.w2c[0, 0, 0], norm=self.pointmap_norm)
        video = b.rgb[0, 0].permute(1, 0, 2, 3)[None]  # [1, 3, T, H, W]
        device = self.hparams.encode_device or ("cuda" if torch.cuda.is_available() else "cpu")
        if get_worker_info() is not None:  # a forked loader worker cannot use CUDA
            device = "cpu"
        self._vae.to(device)
        out = {
            "rgb_latents": encode_video(self._vae, video)[0],
            "xyz_latents": encode_pointmaps(self._vae, xyz[None], h.latent_shift, h.latent_scale)[0],
            "xyz_center": norm.centers,
            "xyz_scale": norm.scale.reshape(()),
        }
        if self._cond_id is not None:
            out["cond_latents"] = self.conditioning.encode(self._vae, video)[0]
        return {k: v.cpu().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def pointmap_latent_stats(self, max_clips: int = 64) -> tuple[float, float]:
        """``(latent_shift, latent_scale)`` for this data: the renormalisation that gives the
        training clips' pointmap latents zero mean and unit std (4DNeX's 0.13 / 1.70 are those of
        4DNeX-10M). Encodes up to ``max_clips`` training clips with the ``vae`` spec."""
        if self.hparams.vae is None:
            raise ValueError(
                "PointmapDataModule.pointmap_latent_stats: needs data.vae (the model's VAE spec)"
            )
        GridDataModule.prepare_data(self)  # synthetic scenes only (if configured), not the caches
        self.setup()
        base = self._dataset("train").base
        vae = build_vae(**self.hparams.vae).eval()
        zs = []
        for i in range(min(len(base.scenes), max_clips)):
            b = base[i]
            xyz, _ = prepare_pointmaps(world_pointmaps(b)[0, 0], b.w2c[0, 0, 0], norm=self.pointmap_norm)
            zs.append(encode_pointmaps(vae, xyz[None], 0.0, 1.0).flatten())
        return latent_stats(torch.cat(zs))

    def prepare_data(self) -> None:
        """Write synthetic scenes (if asked) and fill the text and latent caches."""
        super().prepare_data()
        if self.hparams.cache_dir is None:
            return
        self.setup()
        for split in ("train", "val", "test"):
            base = self._dataset(split).base
            for i in range(len(base.scenes)):  # clips are fixed: one per scene
                b = base[i]
                self.embedder(b.caption, b.rgb[:, 0, 0], b.scene_id)
                self.latents_for(b)

    # ------------------------------------------------------------------------------ loaders
    def _dataset(self, split: str) -> _PointmapClips:
        base = super()._dataset(split)
        base.random_sampling = False  # cached latents are of fixed clips (first frames, centre crop)
        return _PointmapClips(base, self)
