"""4DNeX width-wise fusion: RoPE by ids, shared positions of twins, domain embedding, keys."""

from __future__ import annotations

import torch

from fourdgen.backbones.wan import build_transformer
from fourdgen.nn.rope import GridRotaryPosEmbed
from fourdgen.nn.wan_fusion import fuse_width, install_width_fusion, split_width


def _run(model, x, seed=0):
    text = torch.randn(x.shape[0], 5, 32, generator=torch.Generator().manual_seed(seed))
    return model(
        hidden_states=x, timestep=torch.tensor([400.0]), encoder_hidden_states=text, return_dict=False
    )[0]


def test_rope_by_ids_reproduces_wan_and_shares_twin_positions():
    model = build_transformer(preset="tiny")
    x = torch.randn(1, 16, 3, 6, 8)
    ref_cos, ref_sin = model.rope(x)
    grid = GridRotaryPosEmbed.from_rope(model.rope)
    cos, sin = grid(x)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)
    fused = GridRotaryPosEmbed.from_rope(model.rope, width_tiles=2)
    wide = torch.randn(1, 16, 3, 6, 16)
    cos2 = fused(wide)[0].reshape(3, 3, 8, -1)  # (frames, rows, patch columns)
    torch.testing.assert_close(cos2[:, :, :4], cos2[:, :, 4:])  # XYZ twins share positions
    torch.testing.assert_close(cos2[:, :, :4].reshape(1, -1, 1, cos2.shape[-1]), ref_cos)


def test_fusion_keeps_keys_and_starts_symmetric():
    torch.manual_seed(0)
    model = build_transformer(preset="tiny")
    keys = set(model.state_dict())
    stock = {k: v.clone() for k, v in model.state_dict().items()}
    install_width_fusion(model)
    assert set(model.state_dict()) - keys == {"patch_embedding.domain_embedding"}
    missing, unexpected = model.load_state_dict(stock, strict=False)
    assert missing == ["patch_embedding.domain_embedding"] and not unexpected
    rgb = torch.randn(1, 16, 3, 6, 8)
    out = _run(model, fuse_width(rgb, rgb))
    a, b = split_width(out)
    # zero domain embedding + shared positions: identical halves give identical outputs ...
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # ... and the embedding is what tells the halves apart once it is learned
    with torch.no_grad():
        model.patch_embedding.domain_embedding[1].normal_()
    a, b = split_width(_run(model, fuse_width(rgb, rgb)))
    assert (a - b).abs().max() > 1e-3
