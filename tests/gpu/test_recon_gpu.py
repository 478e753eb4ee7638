"""Stage 2 on a GPU: VGGT CUDA vs CPU, the 1b-size model vs the official code (when its source is
available, see conftest's ``official_vggt``) in fp32 and bf16, and reconstructor training steps with
gsplat under bf16-mixed precision."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from fourdgen.backbones.vggt import VGGT
from fourdgen.backbones.vggt_checkpoint import load_official, official_state_dict
from fourdgen.models.gaussian_recon import GaussianReconstructor
from fourdgen.stages.recon import FeedForwardReconstruction
from tests.test_recon import _dm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("gsplat_built_once"),
]


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_cuda_matches_cpu():
    torch.manual_seed(0)
    model = VGGT("tiny", temporal=True).eval()
    for blk in model.aggregator.temporal_blocks:
        torch.nn.init.normal_(blk.attn.proj.weight, std=0.1)
    x = torch.rand(1, 3, 2, 3, 42, 56)
    with torch.no_grad():
        a = model(x)
        b = model.cuda()(x.cuda())
    for name in ("pose_enc", "depth", "world_points"):
        torch.testing.assert_close(getattr(b, name).cpu(), getattr(a, name), atol=1e-4, rtol=1e-4)


def test_1b_matches_the_official_model(official_vggt):
    """The full-size official VGGT (random weights) and ours loaded from its state dict: fp32
    outputs agree to fp32 rounding; under bf16 autocast both stay within a few % of fp32."""
    from vggt.models.vggt import VGGT as Official

    torch.manual_seed(0)
    ref = Official().cuda().eval()
    ours = VGGT("1b").cuda().eval()
    load_official(ours, ref.state_dict())
    assert set(official_state_dict(ours)) == set(ref.state_dict())
    x = torch.rand(1, 3, 3, 350, 518, device="cuda")
    keys = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")
    with torch.no_grad():
        a, b = ref(x), ours.forward_official(x)
        for k in keys:
            print(f"fp32 {k}: rel {_rel(b[k], a[k]):.2e}")
            assert _rel(b[k], a[k]) < 1e-4, k
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a16, b16 = ref(x), ours.forward_official(x)
        for k in keys:
            print(f"bf16 {k}: ours rel {_rel(b16[k], a[k]):.2e}, official rel {_rel(a16[k], a[k]):.2e}")
            assert _rel(b16[k], a[k]) < max(0.05, 3 * _rel(a16[k], a[k])), k
    # the track head too (official query-point tracking)
    q = torch.rand(1, 16, 2, device="cuda") * torch.tensor([517.0, 349.0], device="cuda")
    with torch.no_grad():
        ta, tb = ref(x, query_points=q), ours.forward_official(x, query_points=q)
    print(f"fp32 track: max px {float((ta['track'] - tb['track']).abs().max()):.2e}")
    torch.testing.assert_close(tb["track"], ta["track"], atol=1e-2, rtol=1e-4)


def test_reconstructor_bf16_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    model = GaussianReconstructor("tiny").cuda().eval()
    x = torch.rand(1, 2, 3, 3, 56, 56, device="cuda")
    with torch.no_grad():
        a = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            b = model(x)
    assert all(torch.isfinite(v).all() for v in b.gaussians.values())
    assert _rel(b.gaussians["means"], a.gaussians["means"]) < 0.05


def test_compiled_blocks_equal_eager_in_fp32_and_bf16():
    """``compile_blocks`` (inductor, one graph per block shape) gives eager's reconstruction: fp32 to
    rounding, bf16 within bf16's own distance from fp32. Non-zero temporal blocks, so they count."""
    torch.manual_seed(0)
    model = GaussianReconstructor("tiny", dpt_features=32).cuda().eval()
    for blk in model.vggt.aggregator.temporal_blocks:
        torch.nn.init.normal_(blk.attn.proj.weight, std=0.1)
        torch.nn.init.normal_(blk.mlp.fc2.weight, std=0.1)
    x = torch.rand(1, 3, 4, 3, 56, 70, device="cuda")
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref16 = model(x)
        model.vggt.compile_blocks()
        got = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got16 = model(x)
    for k in ("means", "log_scales", "opacity_logits", "sh0"):
        assert _rel(got.gaussians[k], ref.gaussians[k]) < 1e-4, k
        bf16 = _rel(ref16.gaussians[k], ref.gaussians[k])  # eager bf16's own error
        assert _rel(got16.gaussians[k], ref.gaussians[k]) < max(0.02, 3 * bf16), k
    assert _rel(got.w2c, ref.w2c) < 1e-4 and _rel(got.depth, ref.depth) < 1e-4


def test_training_steps_with_gsplat_bf16(tmp_path):
    torch.manual_seed(0)
    dm = _dm(tmp_path, num_frames=2)
    model = FeedForwardReconstruction(
        preset="tiny",
        training_stage="dynamic",
        backend="gsplat",
        gradient_checkpointing=True,
        lr=3e-3,
        warmup_steps=2,
        lpips_weight=0.1,
        lpips_allow_random_backbone=True,
    )
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=1,
    )
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    metrics = trainer.validate(model, dm, verbose=False)[0]
    assert metrics["val/psnr"] > 0
