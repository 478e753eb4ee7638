"""LoRA export/import: exact round trip, and a stock diffusers Wan reproduces fourdgen's output."""

from __future__ import annotations

import pytest
import torch

from fourdgen.backbones.wan import build_transformer
from fourdgen.nn.lora import EXTRA_FILE, LORA_FILE, add_lora, extra_trainable_state, load_lora, save_lora
from fourdgen.nn.wan_fusion import fuse_width, install_width_fusion


def _run(model, x):
    text = torch.randn(x.shape[0], 5, 32, generator=torch.Generator().manual_seed(1))
    return model(
        hidden_states=x, timestep=torch.tensor([300.0]), encoder_hidden_states=text, return_dict=False
    )[0]


def _base(tmp_path):
    torch.manual_seed(0)
    base = build_transformer(preset="tiny")
    base.save_pretrained(tmp_path / "base" / "transformer")
    return tmp_path / "base"


def _trained_lora(model):
    add_lora(model, rank=4, alpha=2)
    x = torch.randn(1, 16, 2, 4, 8)
    before = _run(model, x)
    with torch.no_grad():  # stand-in for training: non-zero B matrices
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    assert (_run(model, x) - before).abs().max() > 1e-3
    return model


def test_lora_starts_as_identity_and_only_lora_and_extras_train(tmp_path):
    base = _base(tmp_path)
    model = build_transformer(path=str(base))
    x = torch.randn(1, 16, 2, 4, 8)
    ref = _run(model, x)
    add_lora(model, rank=4, alpha=2)
    torch.testing.assert_close(_run(model, x), ref, rtol=0, atol=0)  # B starts at zero
    fused = install_width_fusion(build_transformer(path=str(base)))
    add_lora(fused, rank=4, alpha=2)
    assert _run(fused, fuse_width(x, x)).shape == (1, 16, 2, 4, 16)
    trainable = {n for n, p in fused.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n == "patch_embedding.domain_embedding" for n in trainable)
    assert set(extra_trainable_state(fused)) == {"patch_embedding.domain_embedding"}


def test_round_trip_with_extras_is_exact(tmp_path):
    base = _base(tmp_path)
    model = install_width_fusion(build_transformer(path=str(base)))
    _trained_lora(model)
    with torch.no_grad():
        model.patch_embedding.domain_embedding.normal_()
    out = save_lora(model, tmp_path / "export")
    assert (out / LORA_FILE).is_file() and (out / EXTRA_FILE).is_file()
    x = fuse_width(torch.randn(1, 16, 2, 4, 8), torch.randn(1, 16, 2, 4, 8))
    fresh = install_width_fusion(build_transformer(path=str(base)))
    load_lora(fresh, out)
    torch.testing.assert_close(_run(fresh, x), _run(model, x), rtol=0, atol=0)
    # extras without the matching component installed are refused, with a clear message
    with pytest.raises(KeyError, match="domain_embedding"):
        load_lora(build_transformer(path=str(base)), out, adapter_name="other")


def test_stock_diffusers_loads_the_exported_lora(tmp_path):
    from diffusers import WanTransformer3DModel

    base = _base(tmp_path)
    model = _trained_lora(build_transformer(path=str(base)))
    save_lora(model, tmp_path / "export")
    stock = WanTransformer3DModel.from_pretrained(base, subfolder="transformer")
    stock.load_lora_adapter(str(tmp_path / "export"), weight_name=LORA_FILE, prefix="transformer")
    x = torch.randn(1, 16, 2, 4, 8)
    torch.testing.assert_close(_run(stock, x), _run(model, x), rtol=1e-5, atol=1e-5)
    # the file-path form ignores the file's metadata: alpha/rank is baked into B so it agrees too
    stock2 = WanTransformer3DModel.from_pretrained(base, subfolder="transformer")
    stock2.load_lora_adapter(str(tmp_path / "export" / LORA_FILE), prefix="transformer")
    torch.testing.assert_close(_run(stock2, x), _run(model, x), rtol=1e-5, atol=1e-5)
