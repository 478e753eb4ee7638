"""Text embeddings for the Wan DiT, computed once and cached on disk.

- :class:`UMT5TextEncoder`: Wan's umT5-XXL from a local diffusers checkpoint (``tokenizer/`` and
  ``text_encoder/``), embedding exactly as diffusers' Wan pipelines do: states of the real tokens,
  zero-padded to ``max_length``.
- :class:`HashTextEncoder`: a stand-in without weights for synthetic data and tests: every word maps
  to a fixed pseudo-random vector (same layout: word states, zero padding). It carries no meaning.
:func:`embed_cached` stores one safetensors file per (prompt, encoder) under ``cache_dir/text``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from fourdgen.io import atomic_path, read_cache


class HashTextEncoder:
    """Deterministic word -> vector embedding ``[B, length, dim]`` (no model, no semantics)."""

    def __init__(self, dim: int = 4096, length: int = 512, seed: int = 0):
        self.dim, self.length, self.seed = dim, length, seed

    @property
    def id(self) -> str:
        return f"hash-{self.dim}-{self.length}-{self.seed}"

    def __call__(self, prompts: list[str]) -> Tensor:
        out = torch.zeros(len(prompts), self.length, self.dim)
        for i, prompt in enumerate(prompts):
            for j, word in enumerate(prompt.split()[: self.length]):
                digest = hashlib.sha1(f"{self.seed}:{word}".encode()).digest()
                g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
                out[i, j] = torch.randn(self.dim, generator=g)
        return out


class UMT5TextEncoder:
    """Wan's text encoder from a local diffusers-format checkpoint (nothing is downloaded)."""

    def __init__(
        self,
        path: str,
        max_length: int = 512,
        dtype: str = "bfloat16",
        device: str = "cuda" if torch.cuda.is_available() else "cpu",
    ):
        self.path, self.max_length, self.dtype, self.device = path, max_length, dtype, device
        self._model = self._tokenizer = None

    @property
    def id(self) -> str:
        # "-clean": prompts go through diffusers' prompt_clean (caches from before are not reused)
        return f"umt5-{Path(self.path).resolve()}-{self.max_length}-{self.dtype}-clean"

    def _load(self) -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = Path(self.path)
        for sub in ("tokenizer", "text_encoder"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(
                    f"UMT5TextEncoder: {root / sub} is missing (local diffusers Wan checkpoint)"
                )
        self._tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        self._model = (
            UMT5EncoderModel.from_pretrained(
                root / "text_encoder", torch_dtype=getattr(torch, self.dtype), local_files_only=True
            )
            .to(self.device)
            .eval()
        )

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Tensor:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # as the pipelines: html, whitespace

        if self._model is None:
            self._load()
        tok = self._tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        states = self._model(ids, mask).last_hidden_state.float()
        return states * mask[..., None]  # diffusers' Wan pipelines: real tokens, then zeros


def embed_cached(encoder, prompts: list[str], cache_dir: str | Path | None) -> Tensor:
    """Embeddings ``[B, L, D]`` of ``prompts``, read from / written to ``cache_dir/text``."""
    if cache_dir is None:
        return encoder(prompts)
    out = []
    for prompt in prompts:
        key = hashlib.sha1(f"{encoder.id}\n{prompt}".encode()).hexdigest()[:20]
        path = Path(cache_dir) / "text" / f"{key}.safetensors"
        cached = read_cache(path, ("embeds",))
        if cached is not None:
            out.append(cached["embeds"])
            continue
        emb = encoder([prompt])[0].contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"embeds": emb}, str(tmp), metadata={"prompt": prompt, "encoder": encoder.id})
        out.append(emb)
    return torch.stack(out)
