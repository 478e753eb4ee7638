"""VGGT backbone: the official checkpoint layout (every key used), parity with the official code
(when its source is available, see conftest's ``official_vggt``; on every run against the outputs
it recorded, ``tests/data/vggt_goldens.safetensors``), camera decoding, and the 4Real-Video-V2
additions (zero-initialised temporal attention, camera-token replacement)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fourdgen.backbones.vggt import VGGT, VGGTConfig
from fourdgen.backbones.vggt_checkpoint import load_official, official_state_dict, read_state_dict
from fourdgen.geometry.cameras import cameras_to_vggt_pose_encoding, is_rigid
from fourdgen.geometry.cameras import vggt_pose_encoding_to_cameras as pose_encoding_to_cameras

SHAPES = Path(__file__).parent / "data" / "vggt_1b_state_dict_shapes.json"
# Small enough for CPU; 3 block pairs; DINOv2-S-sized patch embedding so the official code can
# build the same model (its DINO sizes are fixed presets).
SMALL = VGGTConfig(
    img_size=56,
    embed_dim=384,
    depth=3,
    num_heads=6,
    dino_depth=12,
    dino_heads=6,
    camera_trunk_depth=2,
    dpt_features=32,
    dpt_out_channels=(16, 32, 64, 64),
    dpt_layers=(0, 1, 2, 2),
)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Layer scales, special tokens and position embeddings start tiny or zero: make them matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("gamma", "token", "pos_embed")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _tiny(**kw) -> VGGT:
    torch.manual_seed(0)
    model = VGGT("tiny", **kw)
    _randomize(model)
    return model.eval()


def test_1b_preset_has_the_official_layout():
    """Every official VGGT-1B key (names and shapes recorded from facebookresearch/vggt) maps to a
    weight of the ``1b`` preset and back, none missing or left over."""
    official = json.loads(SHAPES.read_text())
    with torch.device("meta"):
        model = VGGT("1b")
    ours = {k: list(v.shape) for k, v in official_state_dict(model).items()}
    assert set(ours) == set(official)
    assert {k: v for k, v in ours.items() if official[k] != v} == {}
    assert sum(math.prod(s) for s in official.values()) > 1.2e9


def test_official_layout_round_trip(tmp_path):
    """A random model saved in the official layout loads into a fresh one with identical outputs,
    with a non-zero class position embedding (folded into the class token on load)."""
    src = _tiny(depth_head=True, point_head=True)
    sd = official_state_dict(src)
    pos0 = torch.randn_like(sd["aggregator.patch_embed.pos_embed"][:, :1])
    sd["aggregator.patch_embed.pos_embed"][:, :1] = pos0
    sd["aggregator.patch_embed.cls_token"] = sd["aggregator.patch_embed.cls_token"] - pos0
    torch.save(sd, tmp_path / "model.pt")
    dst = VGGT("tiny").eval()
    load_official(dst, tmp_path)  # a folder holding model.pt
    x = torch.rand(1, 3, 2, 3, 28, 42)
    with torch.no_grad():
        a, b = src(x), dst(x)
    for name in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)
    assert set(read_state_dict(tmp_path / "model.pt")) == set(official_state_dict(dst))


def test_load_official_rejects_a_mismatched_checkpoint(tmp_path):
    sd = official_state_dict(_tiny())
    model = VGGT("tiny")
    extra = {**sd, "aggregator.bogus": torch.zeros(1)}
    with pytest.raises(KeyError, match="aggregator.bogus"):
        load_official(model, extra)
    partial = {k: v for k, v in sd.items() if not k.startswith("depth_head.")}
    with pytest.raises(KeyError, match="missing from it.*depth_head"):
        load_official(model, partial)
    with pytest.raises(KeyError, match="shape mismatches"):
        load_official(model, {**sd, "camera_head.empty_pose_tokens": torch.zeros(1, 1, 8)})
    with pytest.raises(KeyError, match="point_head"):  # skip names a head the model has
        load_official(VGGT("tiny", point_head=False), sd)
    load_official(VGGT("tiny", point_head=False), sd, skip=("point_head.",))
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_official(model, tmp_path / "nowhere.pt")


def test_matches_the_official_implementation(official_vggt):
    """Official modules with random weights -> load_official -> identical outputs (fp32), at a
    non-square size that makes DINOv2 resample its position embedding."""
    from vggt.heads.camera_head import CameraHead
    from vggt.heads.dpt_head import DPTHead
    from vggt.models.aggregator import Aggregator
    from vggt.models.vggt import VGGT as Official

    torch.manual_seed(0)
    ref = Official.__new__(Official)
    torch.nn.Module.__init__(ref)
    ref.aggregator = Aggregator(
        img_size=56, patch_size=14, embed_dim=384, depth=3, num_heads=6, patch_embed="dinov2_vits14_reg"
    )
    ref.camera_head = CameraHead(dim_in=768, trunk_depth=2, num_heads=6)
    dpt = dict(dim_in=768, intermediate_layer_idx=[0, 1, 2, 2], features=32, out_channels=[16, 32, 64, 64])
    ref.point_head = DPTHead(output_dim=4, activation="inv_log", conf_activation="expp1", **dpt)
    ref.depth_head = DPTHead(output_dim=2, activation="exp", conf_activation="expp1", **dpt)
    ref.track_head = None
    _randomize(ref)
    ref.eval()
    ours = VGGT(SMALL).eval()
    load_official(ours, ref.state_dict())
    x = torch.rand(1, 3, 3, 42, 70)
    with torch.no_grad():
        a, b = ref(x), ours.forward_official(x)
    for k in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
    assert set(official_state_dict(ours)) == set(ref.state_dict())

    from vggt.utils.pose_enc import pose_encoding_to_extri_intri

    enc = torch.cat([a["pose_enc"][..., :7], a["pose_enc"][..., 7:].clamp(0.2, 3.0)], -1)  # random FoVs
    extri, intri = pose_encoding_to_extri_intri(enc, (42, 70))
    K, w2c = pose_encoding_to_cameras(enc, (42, 70))
    torch.testing.assert_close(w2c[..., :3, :], extri, atol=1e-5, rtol=1e-5)
    shift = torch.tensor([[0, 0, 0.5], [0, 0, 0.5], [0, 0, 0]])  # pixel-centre convention
    torch.testing.assert_close(K, intri + shift, atol=1e-4, rtol=1e-5)
    from vggt.utils.pose_enc import extri_intri_to_pose_encoding

    theirs = extri_intri_to_pose_encoding(extri, intri, (42, 70))
    mine = cameras_to_vggt_pose_encoding(K, w2c, (42, 70))
    sign = (theirs[..., 3:7] * mine[..., 3:7]).sum(-1, keepdim=True).sign()  # q and -q: one rotation
    torch.testing.assert_close(mine[..., 3:7] * sign, theirs[..., 3:7], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mine[..., [0, 1, 2, 7, 8]], theirs[..., [0, 1, 2, 7, 8]], atol=1e-4, rtol=1e-4)


def test_matches_recorded_official_outputs(vggt_goldens):
    """Like the test above on every run, without the official source: fourdgen's model with the
    seed-derived weights of ``tools/make_vggt_goldens.py`` gives the outputs that the official code
    gave with them (recorded in ``tests/data/vggt_goldens.safetensors``)."""
    tool, golden, meta = vggt_goldens
    ours = VGGT(SMALL).eval()
    shapes = {k: tuple(v.shape) for k, v in official_state_dict(ours).items()}
    assert tool.layout_digest(shapes) == meta["vggt.layout_sha256"]  # the official key names and shapes
    load_official(ours, tool.seeded_weights(shapes, gain=tool.VGGT_GAIN))
    x = golden["vggt.images"]
    assert tuple(x.shape) == tool.VGGT_INPUT
    with torch.no_grad():
        out = ours.forward_official(x)
    for k in tool.VGGT_OUTPUTS:
        torch.testing.assert_close(out[k], golden[f"vggt.{k}"], atol=1e-5, rtol=1e-5)


def test_golden_tool_needs_the_official_source(vggt_goldens, tmp_path, capsys):
    tool = vggt_goldens[0]
    assert tool.main([str(tmp_path), "--out", str(tmp_path / "g.safetensors")]) == 1
    assert "no vggt/ package" in capsys.readouterr().err and not (tmp_path / "g.safetensors").exists()


def test_pose_encoding_to_cameras():
    """Identity quaternion (xyzw), a translation and fields of view give the expected cameras."""
    enc = torch.tensor([0.1, -0.2, 0.3, 0.0, 0.0, 0.0, 1.0, math.radians(60), math.radians(90)])
    K, w2c = pose_encoding_to_cameras(enc, (40, 80))
    torch.testing.assert_close(w2c[:3, :3], torch.eye(3))
    torch.testing.assert_close(w2c[:3, 3], enc[:3])
    assert K[0, 0] == pytest.approx(40.0) and K[1, 1] == pytest.approx(20.0 / math.tan(math.radians(30)))
    assert (K[0, 2], K[1, 2]) == (40.5, 20.5)
    q = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    _, w2c = pose_encoding_to_cameras(torch.cat([torch.randn(5, 3), q, torch.zeros(5, 2)], -1), (8, 8))
    assert is_rigid(w2c).all()
    K, _ = pose_encoding_to_cameras(torch.zeros(9), (8, 8))  # untrained head: FoV 0 -> clamped
    assert torch.isfinite(K).all()
    enc = torch.cat([torch.randn(5, 3), q * q[:, 3:].sign(), torch.rand(5, 2) + 0.5], -1)  # w >= 0
    K, w2c = pose_encoding_to_cameras(enc, (30, 50))
    torch.testing.assert_close(cameras_to_vggt_pose_encoding(K, w2c, (30, 50)), enc, atol=1e-5, rtol=1e-5)


def test_temporal_attention_starts_as_identity():
    """With zero-initialised temporal blocks the dynamic model is VGGT applied to each timestep,
    and training still reaches the temporal blocks (non-zero gradients)."""
    base = _tiny(camera_token_replacement=False)
    dyn = VGGT("tiny", temporal=True, camera_token_replacement=False).eval()
    missing, unexpected = dyn.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("aggregator.temporal_blocks.") for k in missing)
    x = torch.rand(1, 2, 3, 3, 28, 28)
    with torch.no_grad():
        a, b = base(x), dyn(x)
        for t in range(3):  # each timestep alone, the official model
            c = base(x[:, :, t : t + 1])
            torch.testing.assert_close(a.depth[:, :, t : t + 1], c.depth, atol=1e-5, rtol=1e-5)
    for name in ("pose_enc", "depth", "world_points"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-6, rtol=1e-6)
    dyn.train()
    dyn(x).depth.mean().backward()
    grads = [p.grad for n, p in dyn.named_parameters() if "temporal_blocks" in n and "proj" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_camera_token_replacement_shares_the_first_timesteps_cameras():
    torch.manual_seed(1)
    x = torch.rand(1, 3, 4, 3, 28, 28)  # every timestep different
    model = _tiny(temporal=True)
    for blk in model.aggregator.temporal_blocks:  # trained-looking temporal blocks
        torch.nn.init.normal_(blk.attn.proj.weight, std=0.2)
    with torch.no_grad():
        out = model(x)
        model.camera_token_replacement = False
        free = model(x)
    assert torch.equal(out.w2c, out.w2c[:, :, :1].expand_as(out.w2c))
    assert torch.equal(out.K, out.K[:, :, :1].expand_as(out.K))
    assert not torch.allclose(
        free.pose_enc[:, :, 1:], free.pose_enc[:, :, :1].expand_as(free.pose_enc[:, :, 1:])
    )
    # the shared cameras are those the first timestep's tokens give
    torch.testing.assert_close(out.pose_enc[:, :, 0], free.pose_enc[:, :, 0], atol=1e-6, rtol=1e-6)


def test_gradient_checkpointing_matches():
    x = torch.rand(1, 2, 2, 3, 28, 28)
    grads = []
    for ckpt in (False, True):
        model = _tiny(temporal=True).train()
        model.set_gradient_checkpointing(ckpt)
        out = model(x)
        (out.depth.mean() + out.pose_enc.square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_rejects_sizes_off_the_patch_grid():
    with pytest.raises(ValueError, match="divisible by 14"):
        VGGT("tiny")(torch.rand(1, 1, 1, 3, 30, 28))
    with pytest.raises(ValueError, match="preset"):
        VGGT("huge")


def test_runs_in_float64():
    """The official code runs in float64 too: the whole model in float64 keeps float64 through the
    camera head and the dense heads, and agrees with the float32 model on the same weights."""
    model = _tiny(temporal=True)
    x = torch.rand(1, 2, 2, 3, 28, 28)
    with torch.no_grad():
        ref = model(x)
        out = model.double()(x.double())
    for name in ("pose_enc", "K", "w2c", "depth", "depth_conf", "world_points", "world_points_conf"):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == torch.float64, name
        torch.testing.assert_close(got.float(), want, atol=1e-4, rtol=1e-4, msg=name)
