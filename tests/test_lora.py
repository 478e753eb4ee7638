"""LoRA export/import: exact round trip, and a stock diffusers Wan reproduces fourdgen's output."""

from __future__ import annotations

import pytest
import torch

from fourdgen.backbones.wan import build_transformer
from fourdgen.errors import FileFormatError
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
    with pytest.raises(
        FileFormatError, match=r"fourdgen_extra\.safetensors: field 'patch_embedding\.domain_embedding'"
    ):
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


# --- full fine-tuning: float32 master weights next to a bf16 base ----------------------------------


def _bf16_grid(**kw):
    from fourdgen.nn.grid_coupling import ProjectionGrid
    from fourdgen.stages.grid import GridDiffusion

    model = GridDiffusion(
        transformer={"preset": "tiny"},
        coupling=ProjectionGrid(),
        base_dtype="bfloat16",
        lora_rank=0,
        lpips_net=None,
        **kw,
    )
    model.configure_model()
    return model


def test_full_finetune_trains_float32_master_weights():
    whole = _bf16_grid()
    params = dict(whole.transformer.named_parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params.values())
    part = _bf16_grid(train_modules=["attn1."])
    trainable = {n: p for n, p in part.transformer.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in part.transformer.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for p in frozen.values())
    assert any("camera_encoder" in n for n in trainable)  # the coupling's new layers train too


def _grid_batch(seed=0):
    from fourdgen.batch import GridBatch

    g = torch.Generator().manual_seed(seed)
    B, V, T, H, W = 1, 2, 5, 16, 16
    w2c = torch.eye(4).repeat(B, V, T, 1, 1)
    w2c[:, 1, :, 0, 3] = 0.2
    return GridBatch(
        rgb=torch.rand(B, V, T, 3, H, W, generator=g) * 2 - 1,
        K=torch.tensor([[16.0, 0, 8], [0, 16, 8], [0, 0, 1]]).repeat(B, V, 1, 1),
        w2c=w2c,
        observed=torch.zeros(B, V, T, dtype=torch.bool),
        times=torch.linspace(0, 1, T)[None],
        view_ids=torch.arange(V)[None],
        time_ids=torch.arange(T)[None],
        depth=torch.full((B, V, T, 1, H, W), 2.0),
        text_embeds=torch.randn(B, 8, 32, generator=g),
    )


@pytest.mark.parametrize("train_modules", [None, ["attn1."]])
def test_bf16_mixed_training_step_updates_float32_weights(tmp_path, train_modules):
    """Under Lightning's bf16-mixed on CPU the DiT computes in bf16, AdamW's state is float32 and one
    step changes the trained weights (the frozen ones stay)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from fourdgen.batch import GridBatch

    torch.manual_seed(0)
    model = _bf16_grid(train_modules=train_modules, lr=1e-3)
    named = dict(model.transformer.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    dtypes = []
    model.transformer.blocks[0].ffn.net[0].proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    data = DataLoader([_grid_batch()], batch_size=1, collate_fn=GridBatch.collate)
    trainer.fit(model, data)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # compute in bf16
    state = trainer.optimizers[0].state
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    changed = {n for n, p in named.items() if not torch.equal(p.detach(), before[n])}
    trained = {n for n, p in named.items() if p.requires_grad}
    assert changed and changed <= trained
    assert all(named[n].dtype == torch.float32 for n in trained)
    # blocks' own weights move (not only the zero-initialised new layers)
    assert any("blocks.0.attn1.to_q" in n for n in changed)


def _write_official_4dnex_release(folder, model, rank=4):
    """The official release's files, written as its trainer writes them: peft keys under
    ``transformer.`` in a safetensors file with no adapter metadata (``save_lora_weights`` without
    ``transformer_lora_adapter_metadata``), and ``torch.save`` of the ``[2, dim]`` domain embeddings."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    lora = {}
    for name, mod in model.named_modules():
        if name.startswith("blocks.") and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.1
            lora[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.1
    folder.mkdir(parents=True)
    save_file(lora, str(folder / LORA_FILE))
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    emb = torch.randn(2, dim, generator=g).to(torch.bfloat16)
    torch.save(emb, folder / "learnable_domain_embeddings.pt")
    return lora, emb


def test_official_4dnex_release_loads_as_fused_at_half_scale_with_domain_embeddings(tmp_path):
    """Reference: the official inference by hand, ``W += 0.5 * B @ A`` on every LoRA target and the
    domain embeddings added to each width half after patch embedding."""
    torch.manual_seed(0)
    model = install_width_fusion(build_transformer(preset="tiny"))
    lora, emb = _write_official_4dnex_release(tmp_path / "release", model)
    torch.manual_seed(0)
    ref = install_width_fusion(build_transformer(preset="tiny"))
    with torch.no_grad():
        mods = dict(ref.named_modules())
        for key, A in lora.items():
            if "lora_A" in key:
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                B = lora[key.replace("lora_A", "lora_B")]
                mods[name].weight += 0.5 * B @ A
        ref.patch_embedding.domain_embedding.copy_(emb.float())
    load_lora(model, tmp_path / "release")
    x = fuse_width(torch.randn(1, 16, 2, 4, 4), torch.randn(1, 16, 2, 4, 4))
    with torch.no_grad():
        torch.testing.assert_close(_run(model, x), _run(ref, x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="width fusion"):
        load_lora(build_transformer(preset="tiny"), tmp_path / "release")


def test_official_4dnex_release_as_the_stage_init_lora(tmp_path):
    """``init_lora: <official release folder>`` starts the 4DNeX stage from it: the domain embeddings
    are loaded and train with the LoRA."""
    from fourdgen.stages.video import VideoDiffusion

    _, emb = _write_official_4dnex_release(
        tmp_path / "release", install_width_fusion(build_transformer(preset="tiny"))
    )
    model = VideoDiffusion(init_lora=str(tmp_path / "release"))
    model.configure_model()
    torch.testing.assert_close(model.transformer.patch_embedding.domain_embedding.data, emb.float())
    trainable = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert "patch_embedding.domain_embedding" in trainable and all(
        "lora_" in n or "domain" in n for n in trainable
    )
