"""UMT5TextEncoder on a tiny umT5 + tokenizer built, saved and loaded back here (nothing downloaded):
embeddings as diffusers' Wan pipelines compute them (real-token states, zero padding)."""

from __future__ import annotations

import pytest
import torch

from fourdgen.backbones.text import UMT5TextEncoder, embed_cached

WORDS = ["a", "red", "ball", "rolls", "over", "the", "floor", "cat", "jumps", "POINTMAP_STYLE."]


def _checkpoint(root):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    cfg = UMT5Config(
        vocab_size=len(vocab), d_model=16, d_kv=4, num_heads=2, num_layers=1, d_ff=32,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    UMT5EncoderModel(cfg).eval().save_pretrained(root / "text_encoder")
    return root


def _reference(root, prompts, max_length):
    """diffusers' WanPipeline._get_t5_prompt_embeds, step by step."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    enc = UMT5EncoderModel.from_pretrained(root / "text_encoder").eval()
    t = tok(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
            return_attention_mask=True, return_tensors="pt")  # fmt: skip
    seq_lens = t.attention_mask.gt(0).sum(dim=1).long()
    with torch.no_grad():
        states = enc(t.input_ids, t.attention_mask).last_hidden_state
    rows = [u[:v] for u, v in zip(states, seq_lens, strict=True)]
    return torch.stack([torch.cat([u, u.new_zeros(max_length - u.size(0), u.size(1))]) for u in rows])


def test_umt5_embeddings_match_diffusers(tmp_path):
    root = _checkpoint(tmp_path / "wan")
    prompts = ["a red ball rolls over the floor", "cat jumps"]
    enc = UMT5TextEncoder(str(root), max_length=8, dtype="float32", device="cpu")
    out = enc(prompts)
    assert out.shape == (2, 8, 16)
    torch.testing.assert_close(out, _reference(root, prompts, 8), rtol=1e-5, atol=1e-6)
    assert out[1, 3:].abs().sum() == 0 and out[1, :3].abs().sum() > 0  # 2 words + </s>, then zeros


def test_umt5_cache_and_missing_folders(tmp_path):
    root = _checkpoint(tmp_path / "wan")
    enc = UMT5TextEncoder(str(root), max_length=8, dtype="float32", device="cpu")
    first = embed_cached(enc, ["cat jumps", "a red ball"], tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 2

    def boom(*a, **k):
        raise AssertionError("the model ran although the embeddings are cached")

    enc._model.forward = boom
    torch.testing.assert_close(embed_cached(enc, ["cat jumps", "a red ball"], tmp_path / "cache"), first)
    assert UMT5TextEncoder(str(root), max_length=16).id != enc.id  # other length, other cache entries
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        UMT5TextEncoder(str(tmp_path / "nowhere"), device="cpu")(["x"])
