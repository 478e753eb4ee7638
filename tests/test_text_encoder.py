"""UMT5TextEncoder against diffusers' Wan prompt embedding, on a tiny umT5 + word-level tokenizer that is
built, saved and loaded back here (offline, CPU, seconds); plus missing folders and the on-disk cache."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from fourdgen.backbones.text import UMT5TextEncoder, embed_cached

WORDS = ["a", "red", "ball", "rolls", "over", "the", "floor", "cat", "&", "dog", "jumps"]
DIM, MAX_LEN = 16, 8


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("wan")
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(root / "tokenizer")
    back = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    assert back("cat jumps").input_ids == [vocab["cat"], vocab["jumps"], 1]
    torch.manual_seed(0)
    cfg = UMT5Config(
        vocab_size=len(vocab), d_model=DIM, d_kv=4, num_heads=2, num_layers=1, d_ff=32,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    UMT5EncoderModel(cfg).eval().save_pretrained(root / "text_encoder")
    return root


def _diffusers_reference(root, prompts, max_length):
    """WanPipeline._get_t5_prompt_embeds, written out with the tokenizer and model themselves."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    model = UMT5EncoderModel.from_pretrained(root / "text_encoder", local_files_only=True).eval()
    t = tok([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt")  # fmt: skip
    seq_lens = t.attention_mask.gt(0).sum(dim=1).long()
    with torch.no_grad():
        states = model(t.input_ids, t.attention_mask).last_hidden_state
    rows = [u[:v] for u, v in zip(states, seq_lens, strict=True)]
    return torch.stack(
        [torch.cat([u, u.new_zeros(max_length - u.size(0), u.size(1))]) for u in rows]
    ), seq_lens


@pytest.mark.parametrize(
    "prompts",
    [
        ["a red ball rolls over the floor", "cat jumps"],
        ["  cat &amp; dog\n", "a red ball rolls over the floor again"],
    ],
    ids=["plain", "html-whitespace-truncated"],
)
def test_embeddings_match_diffusers(wan_dir, prompts):
    out = UMT5TextEncoder(str(wan_dir), max_length=MAX_LEN, dtype="float32", device="cpu")(prompts)
    ref, seq_lens = _diffusers_reference(wan_dir, prompts, MAX_LEN)
    assert out.shape == (2, MAX_LEN, DIM) and out.dtype == torch.float32
    assert seq_lens[0] != seq_lens[1]
    for row, n in zip(out, seq_lens.tolist(), strict=True):
        assert torch.equal(row[n:], torch.zeros_like(row[n:]))  # padding rows are exactly zero
        assert (row[:n].abs().sum(-1) > 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("missing", ["tokenizer", "text_encoder"])
def test_missing_subfolder_is_named(wan_dir, tmp_path, missing):
    root = tmp_path / "wan"
    shutil.copytree(wan_dir, root)
    shutil.rmtree(root / missing)
    enc = UMT5TextEncoder(str(root), max_length=MAX_LEN, dtype="float32", device="cpu")
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / missing))):
        enc(["cat jumps"])


def test_embed_cached_skips_model_and_keys_on_length(wan_dir, tmp_path):
    cache, prompts = tmp_path / "cache", ["cat jumps", "a red ball rolls over the floor"]
    enc = UMT5TextEncoder(str(wan_dir), max_length=MAX_LEN, dtype="float32", device="cpu")
    first = embed_cached(enc, prompts, cache)
    assert first.shape == (2, MAX_LEN, DIM)
    torch.testing.assert_close(first, enc(prompts))  # one prompt at a time == batched
    assert len(list((cache / "text").glob("*.safetensors"))) == 2

    def boom(*args, **kwargs):
        raise AssertionError("the model ran although the embeddings are cached")

    enc._model.forward = boom
    assert torch.equal(embed_cached(enc, prompts, cache), first)
    other = UMT5TextEncoder(str(wan_dir), max_length=2 * MAX_LEN, dtype="float32", device="cpu")
    assert other.id != enc.id
    assert embed_cached(other, prompts, cache).shape == (2, 2 * MAX_LEN, DIM)  # new entries, no mixing
    assert len(list((cache / "text").glob("*.safetensors"))) == 4
