"""Text and image embeddings a Wan DiT is conditioned on, computed once per prompt/image and cached.

Shared by the DataModules of stage 1 (training clips and prediction inputs), so training and
inference embed prompts the same way (same suffix, same negative prompt, same encoders).
"""

from __future__ import annotations

from torch import Tensor

from fourdgen.backbones.image import CLIPImageEncoder, HashImageEncoder, embed_images_cached
from fourdgen.backbones.text import HashTextEncoder, UMT5TextEncoder, embed_cached


class ConditionEmbedder:
    """Embeds captions (+ suffix), the negative prompt and, for Wan I2V checkpoints, the first frame.

    Args:
        text_encoder: umT5 from a local checkpoint, or the weight-free hash stand-in.
        image_encoder: CLIP vision encoder for checkpoints with ``image_dim`` (Wan2.1-I2V); None for
            text-only checkpoints (Wan2.1-Fun-InP, Wan2.2-TI2V).
        prompt_suffix: appended to every caption (4DNeX: "POINTMAP_STYLE.").
        negative_prompt: the CFG negative prompt.
        cache_dir: embeddings are cached under ``cache_dir/text`` and ``cache_dir/image``.
    """

    def __init__(
        self,
        text_encoder: HashTextEncoder | UMT5TextEncoder | None = None,
        image_encoder: CLIPImageEncoder | HashImageEncoder | None = None,
        prompt_suffix: str = "",
        negative_prompt: str = "",
        cache_dir: str | None = None,
    ):
        self.text_encoder = text_encoder or HashTextEncoder()
        self.image_encoder = image_encoder
        self.prompt_suffix, self.negative_prompt, self.cache_dir = prompt_suffix, negative_prompt, cache_dir

    def prompt(self, caption: str) -> str:
        suffix = self.prompt_suffix
        return f"{caption.strip()} {suffix}".strip() if suffix else caption

    def __call__(
        self, captions: list[str], first_frames: Tensor | None = None, keys: list[str] | None = None
    ) -> dict[str, Tensor]:
        """``text_embeds``/``neg_text_embeds [B, L, D]`` and, with an image encoder,
        ``image_embeds [B, N, D']`` of ``first_frames [B, 3, H, W]`` in [-1, 1] (``keys`` name the
        images in the cache, e.g. scene ids)."""
        out = {
            "text_embeds": embed_cached(
                self.text_encoder, [self.prompt(c) for c in captions], self.cache_dir
            ),
            "neg_text_embeds": embed_cached(
                self.text_encoder, [self.negative_prompt] * len(captions), self.cache_dir
            ),
        }
        if self.image_encoder is not None:
            if first_frames is None:
                raise ValueError("ConditionEmbedder: an image encoder is set but no first frames were given")
            keys = keys or [str(i) for i in range(len(captions))]
            out["image_embeds"] = embed_images_cached(self.image_encoder, first_frames, keys, self.cache_dir)
        return out
