"""Stage 1 on a CUDA device: bf16 base weights with float32 LoRA under Lightning's bf16-mixed, and
FSDP2 sharding through Lightning's ModelParallelStrategy (one GPU: a 1-rank mesh)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from fourdgen.backbones.text import HashTextEncoder
from fourdgen.data.pointmaps import PointmapDataModule
from fourdgen.data.synthetic import SyntheticConfig
from fourdgen.diffusion.conditioning import GuidedFirstFrame
from fourdgen.stages.video import VideoDiffusion

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

WIDE = {"preset": "tiny", "overrides": {"num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 256}}


def _dm(tmp_path):
    return PointmapDataModule(
        root=str(tmp_path / "scenes"),
        num_frames=5,
        height=32,
        width=32,
        cache_dir=str(tmp_path / "cache"),
        vae={"preset": "tiny"},
        conditioning=GuidedFirstFrame(),
        text_encoder=HashTextEncoder(dim=32, length=8),
        samples_per_scene=20,
        synthetic=SyntheticConfig(num_views=1, num_frames=5, height=32, width=32, seed=3),
    )


def _trainer(tmp_path, **kw):
    return L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=10,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        **kw,
    )


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_bf16_base_with_float32_lora_trains(tmp_path):
    model = VideoDiffusion(transformer=WIDE, lora_rank=8, lora_alpha=8, lr=1e-3, base_dtype="bfloat16")
    trainer = _trainer(tmp_path, precision="bf16-mixed", enable_checkpointing=True)
    trainer.fit(model, _dm(tmp_path))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    tr = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert tr and all(p.dtype == torch.float32 for p in tr.values())
    frozen = [p for p in model.transformer.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert any(p.abs().sum() > 0 for n, p in tr.items() if "lora_B" in n)  # B moved off zero


def test_fsdp2_through_model_parallel_strategy(tmp_path):
    """Sharded training runs and checkpoints; the sharded model's velocity equals the unsharded."""
    dm = _dm(tmp_path)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    model = VideoDiffusion(transformer=WIDE, lora_rank=8, lora_alpha=8, lr=1e-3, base_dtype="float32")
    trainer = _trainer(tmp_path, strategy=strategy, enable_checkpointing=True)
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(type(p).__name__ == "DTensor" for p in model.transformer.parameters())
    ckpts = list((tmp_path).rglob("*.ckpt"))
    assert ckpts, "no checkpoint written"

    plain = VideoDiffusion(transformer=WIDE, lora_rank=8, lora_alpha=8, base_dtype="float32")
    plain.configure_model()
    plain.cuda()
    trained = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    missing = plain.load_state_dict(trained, strict=False)
    assert not missing.unexpected_keys
    dm.setup()
    b = next(iter(dm.train_dataloader())).to("cuda")
    with torch.no_grad():
        lat = plain.encode(b)
        x = torch.randn_like(plain.coupling.fuse(lat["rgb"], lat["xyz"]))
        t = torch.tensor([500.0], device="cuda")
        ref = plain.velocity(x, lat["cond"], t, b.text_embeds, None)
        got = model.velocity(x, lat["cond"], t, b.text_embeds, None)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sharded", [False, True])
def test_one4d_dlc_trains_in_bf16(tmp_path, sharded):
    """One4D's two-branch LoRA + UMC with a bf16 base: plain bf16-mixed, and FSDP2-sharded
    (per-block units hold the hooked linears and their adapters); the export gathers and writes."""
    from fourdgen.callbacks.lora import LoraExport
    from fourdgen.diffusion.conditioning import MaskedFrames
    from fourdgen.nn.decoupled_lora import DecoupledLoRAControl
    from fourdgen.nn.lora import EXTRA_FILE, LORA_FILE

    model = VideoDiffusion(
        transformer=WIDE,
        coupling=DecoupledLoRAControl(rank=8, num_links=2, targets="all"),
        conditioning=MaskedFrames(seed=0),
        lr=1e-3,
        base_dtype="bfloat16",
    )
    kw = {"strategy": ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)} if sharded else {}
    trainer = _trainer(
        tmp_path,
        precision="32-true" if sharded else "bf16-mixed",
        callbacks=[LoraExport(str(tmp_path / "lora"))],
        **kw,
    )
    trainer.fit(model, _dm(tmp_path))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for f in ("rgb/" + LORA_FILE, "xyz/" + LORA_FILE, EXTRA_FILE):
        assert (tmp_path / "lora" / "final" / f).is_file(), f
