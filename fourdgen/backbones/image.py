"""Image embeddings for Wan I2V DiTs (``config.image_dim``), computed once and cached on disk.

- :class:`CLIPImageEncoder`: the CLIP vision tower of a local diffusers checkpoint
  (``image_processor/`` and ``image_encoder/``, e.g. Wan2.1-I2V-14B-480P-Diffusers), embedding
  exactly as diffusers' ``WanImageToVideoPipeline.encode_image`` does for a PIL image: the
  penultimate hidden states ``[B, 257, 1280]`` (class token + 16x16 patches, no final layer norm).
- :class:`HashImageEncoder`: a stand-in without weights for synthetic data and tests: a fixed random
  projection of a coarse pooled image. Same image, same embedding; it carries no semantics.
:func:`embed_images_cached` stores one safetensors file per (image, key, encoder) under
``cache_dir/image``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from fourdgen.io import atomic_path, read_cache


class HashImageEncoder:
    """Deterministic image -> ``[B, tokens, dim]`` embedding (no model, no semantics).

    The image is average-pooled to a ``grid x grid`` RGB thumbnail (features ``f [B, 3*grid^2]``);
    token ``t`` is ``sum_k f_k A[t, k] W[k]`` with fixed seeded Gaussian ``A [tokens, F]`` and
    ``W [F, dim]``: different images (at thumbnail resolution) give different embeddings, any input
    resolution works, and the matrices stay small (a dense ``F x tokens*dim`` map would not).
    """

    def __init__(self, dim: int = 1280, tokens: int = 257, seed: int = 0, grid: int = 8):
        self.dim, self.tokens, self.seed, self.grid = dim, tokens, seed, grid
        g = torch.Generator().manual_seed(seed)
        feats = 3 * grid * grid
        self._mix = torch.randn(tokens, feats, generator=g)
        self._proj = torch.randn(feats, dim, generator=g) / feats**0.5  # unit-scale outputs

    @property
    def id(self) -> str:
        return f"hash-image-{self.dim}-{self.tokens}-{self.seed}-{self.grid}"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """``images [B, 3, H, W]`` in [-1, 1] -> ``[B, tokens, dim]`` float32 (on the images' device)."""
        f = F.adaptive_avg_pool2d(images.float(), self.grid).flatten(1)  # [B, F]
        mix, proj = self._mix.to(f.device), self._proj.to(f.device)
        return torch.einsum("bk,tk,kd->btd", f, mix, proj)


class CLIPImageEncoder:
    """Wan's CLIP image encoder from a local diffusers-format checkpoint (nothing is downloaded).

    diffusers' I2V example loads ``image_encoder/`` in float32; ``dtype="float32"`` reproduces it
    exactly, bfloat16 (the default, half the memory) differs by bf16 rounding.
    """

    def __init__(
        self,
        path: str,
        dtype: str = "bfloat16",
        device: str = "cuda" if torch.cuda.is_available() else "cpu",
    ):
        self.path, self.dtype, self.device = path, dtype, device
        self._model = self._processor = None

    @property
    def id(self) -> str:
        return f"clip-{Path(self.path).resolve()}-{self.dtype}"

    def _load(self) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModel

        root = Path(self.path)
        for sub in ("image_processor", "image_encoder"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(
                    f"CLIPImageEncoder: {root / sub} is missing (local diffusers Wan I2V checkpoint)"
                )
        # The class diffusers' model_index.json names for Wan2.1-I2V, so preprocessing is the same.
        self._processor = CLIPImageProcessor.from_pretrained(root / "image_processor", local_files_only=True)
        self._model = (
            CLIPVisionModel.from_pretrained(
                root / "image_encoder", torch_dtype=getattr(torch, self.dtype), local_files_only=True
            )
            .to(self.device)
            .eval()
        )

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """``images [B, 3, H, W]`` in [-1, 1] -> ``[B, N_tokens, dim]`` float32 on ``device``.

        The pipeline hands CLIP the user's PIL image (8-bit RGB) while the VAE gets a [-1, 1] tensor,
        so the images are quantised to uint8 exactly as ``PIL.Image.fromarray`` of the frame would
        hold them; an 8-bit source frame therefore embeds bit-identically to the pipeline's PIL path
        (a float [0, 1] input with ``do_rescale=False`` would skip the uint8 rounding after resize and
        drift slightly). Resizing (Wan's config: shortest edge -> 224, bicubic), center crop and
        normalisation are the processor's own, run on CPU like in the pipeline.
        """
        if self._model is None:
            self._load()
        pixels = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        inputs = self._processor(
            images=list(pixels), input_data_format="channels_first", return_tensors="pt"
        ).to(self.device)
        # pixel_values stay float32 as in encode_image; CLIP's patch embedding casts to its dtype.
        states = self._model(**inputs, output_hidden_states=True).hidden_states[-2]
        return states.float()


def _checksum(image: Tensor) -> str:
    """Content hash of one ``[3, H, W]`` image (shape included; float32 bytes)."""
    data = image.detach().float().cpu().contiguous()
    h = hashlib.sha1(str(tuple(data.shape)).encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()


def embed_images_cached(encoder, images: Tensor, keys: list[str], cache_dir: str | Path | None) -> Tensor:
    """Embeddings ``[B, N, D]`` (float32, CPU) of ``images [B, 3, H, W]`` in [-1, 1].

    One file per image under ``cache_dir/image``, named by the encoder id, the image's ``key`` (e.g.
    a scene id) and a checksum of its pixels, so an edited image is re-embedded rather than served
    stale. Misses are embedded in one batch. ``cache_dir=None`` disables the cache.
    """
    if len(keys) != len(images):
        raise ValueError(f"embed_images_cached: {len(images)} images but {len(keys)} keys")
    if cache_dir is None:
        return encoder(images).float().cpu()
    paths = []
    for key, img in zip(keys, images, strict=True):
        name = hashlib.sha1(f"{encoder.id}\n{key}\n{_checksum(img)}".encode()).hexdigest()[:20]
        paths.append(Path(cache_dir) / "image" / f"{name}.safetensors")
    out: list[Tensor | None] = [(read_cache(p, ("embeds",)) or {}).get("embeds") for p in paths]
    missing = [i for i, e in enumerate(out) if e is None]
    if missing:
        embs = encoder(images[missing]).float().cpu()
        for i, emb in zip(missing, embs, strict=True):
            emb = emb.contiguous()
            paths[i].parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(paths[i]) as tmp:
                save_file({"embeds": emb}, str(tmp), metadata={"key": keys[i], "encoder": encoder.id})
            out[i] = emb
    return torch.stack(out)
