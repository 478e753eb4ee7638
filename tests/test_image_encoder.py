"""Image embeddings for Wan I2V: CLIP as diffusers embeds it, the hash stand-in, the disk cache."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from fourdgen.backbones.image import CLIPImageEncoder, HashImageEncoder, embed_images_cached
from fourdgen.backbones.wan import build_transformer


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    """A tiny CLIP vision tower in the diffusers Wan I2V layout: 32 px, 8 px patches -> 1 + 16 tokens."""
    root = tmp_path_factory.mktemp("wan-i2v")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    CLIPVisionModel(cfg).eval().save_pretrained(root / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "image_processor"
    )
    return root


def _images(seed: int, b: int = 2, h: int = 40, w: int = 56) -> tuple[torch.Tensor, np.ndarray]:
    """8-bit frames ``[B, H, W, 3]`` and the same frames as ``[B, 3, H, W]`` in [-1, 1]."""
    px = np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    return torch.from_numpy(px).permute(0, 3, 1, 2).float() / 127.5 - 1, px


def test_clip_encoder_matches_diffusers_encode_image(clip_ckpt):
    enc = CLIPImageEncoder(str(clip_ckpt), dtype="float32", device="cpu")
    images, px = _images(1)  # non-square: exercises the shortest-edge resize and center crop
    out = enc(images)
    assert out.shape == (2, 17, 32) and out.dtype == torch.float32

    # Reference: PIL images through the saved processor and model, as encode_image does.
    processor = CLIPImageProcessor.from_pretrained(clip_ckpt / "image_processor")
    model = CLIPVisionModel.from_pretrained(clip_ckpt / "image_encoder").eval()
    pils = [Image.fromarray(p) for p in px]
    with torch.no_grad():
        ref = model(**processor(images=pils, return_tensors="pt"), output_hidden_states=True).hidden_states[
            -2
        ]
        # ... and diffusers' own method, bound to just the two components it uses.
        pipe = SimpleNamespace(image_processor=processor, image_encoder=model)
        ref_pipe = WanImageToVideoPipeline.encode_image(pipe, pils, torch.device("cpu"))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, ref_pipe, rtol=0, atol=1e-5)
    assert str(clip_ckpt.resolve()) in enc.id and "float32" in enc.id


def test_clip_encoder_names_the_missing_folder(tmp_path):
    (tmp_path / "image_encoder").mkdir()
    with pytest.raises(FileNotFoundError, match="image_processor"):
        CLIPImageEncoder(str(tmp_path), device="cpu")(torch.zeros(1, 3, 8, 8))


def test_hash_encoder_is_deterministic_and_tells_images_apart():
    enc = HashImageEncoder(dim=24, tokens=5, seed=3)
    images, _ = _images(2)
    a = enc(images)
    assert a.shape == (2, 5, 24) and a.dtype == torch.float32
    torch.testing.assert_close(a, HashImageEncoder(dim=24, tokens=5, seed=3)(images), rtol=0, atol=0)
    assert (a[0] - a[1]).abs().max() > 1e-2  # two images differ
    assert (a[0, 0] - a[0, 1]).abs().max() > 1e-2  # tokens differ
    assert not torch.equal(a, HashImageEncoder(dim=24, tokens=5, seed=4)(images))
    assert enc.id != HashImageEncoder(dim=24, tokens=5, seed=4).id


def test_image_cache_reads_back_without_the_model(clip_ckpt, tmp_path):
    enc = CLIPImageEncoder(str(clip_ckpt), dtype="float32", device="cpu")
    images, _ = _images(3)
    a = embed_images_cached(enc, images, ["scene0", "scene1"], tmp_path)
    files = set((tmp_path / "image").iterdir())
    assert len(files) == 2 and a.shape == (2, 17, 32)

    calls = []
    model = enc._model
    enc._model = lambda **kw: calls.append(kw["pixel_values"].shape[0]) or model(**kw)
    b = embed_images_cached(enc, images, ["scene0", "scene1"], tmp_path)
    assert calls == [] and set((tmp_path / "image").iterdir()) == files
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    edited = images.clone()
    edited[1, :, :8] = 1.0  # same key, new pixels: a new file, only that image is embedded
    c = embed_images_cached(enc, edited, ["scene0", "scene1"], tmp_path)
    assert calls == [1] and len(set((tmp_path / "image").iterdir()) - files) == 1
    torch.testing.assert_close(c[0], a[0], rtol=0, atol=0)
    assert not torch.allclose(c[1], a[1])
    torch.testing.assert_close(embed_images_cached(enc, edited, ["scene0", "scene1"], None), c)


def test_embeddings_condition_a_tiny_i2v_transformer(clip_ckpt):
    # image_dim: CLIP width; added_kv_proj_dim: the DiT width (2 heads x 16), which image tokens are
    # projected to before attn2's extra key/value projections (14B-I2V: 1280 -> 5120).
    model = build_transformer(preset="tiny", overrides={"image_dim": 32, "added_kv_proj_dim": 32}).eval()
    image_embeds = CLIPImageEncoder(str(clip_ckpt), dtype="float32", device="cpu")(_images(4)[0])
    torch.manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4)
    text = torch.randn(1, 512, 32)  # Wan's attention splits image/text at exactly 512 text tokens

    def run(img):
        with torch.no_grad():
            return model(
                hidden_states=x,
                timestep=torch.tensor([500.0]),
                encoder_hidden_states=text,
                encoder_hidden_states_image=img,
                return_dict=False,
            )[0]

    a, b = run(image_embeds[:1]), run(image_embeds[1:])
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert (a - b).abs().max() > 1e-4
