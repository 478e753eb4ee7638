"""VGGT track head: shapes on CPU, and parity with the official implementation when its source is
available (the ``official_vggt`` fixture of conftest; those tests skip otherwise) and, on every
run, with the outputs it recorded (``tests/data/vggt_goldens.safetensors``)."""

from __future__ import annotations

import pytest
import torch

from fourdgen.backbones.vggt_track import TrackHead

TINY = dict(dim_in=32, features=16, hidden_size=32, corr_levels=3, corr_radius=2, iters=3)


def _inputs(B=2, S=3, H=28, W=42, N=7, patch_start_idx=5, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = patch_start_idx + (H // 14) * (W // 14)
    tokens = [torch.randn(B, S, P, dim, generator=g) for _ in range(24)]
    query = torch.rand(B, N, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])
    return tokens, query


@pytest.fixture
def official(official_vggt):
    from vggt.heads.track_head import TrackHead as Official

    return Official


def test_shapes():
    torch.manual_seed(0)
    head = TrackHead(**TINY).eval()
    tokens, query = _inputs(B=1)
    with torch.no_grad():
        tracks, vis, conf = head(tokens, (28, 42), 5, query)
    assert len(tracks) == 3
    for t in tracks:
        assert t.shape == (1, 3, 7, 2) and torch.isfinite(t).all()
        torch.testing.assert_close(t[:, 0], query)  # frame 0 stays at the query
    assert vis.shape == conf.shape == (1, 3, 7)
    assert ((vis > 0) & (vis < 1)).all() and ((conf > 0) & (conf < 1)).all()
    assert len(head(tokens, (28, 42), 5, query, iters=1)[0]) == 1
    assert TrackHead(**TINY, predict_conf=False)(tokens, (28, 42), 5, query)[2] is None


def test_matches_official(official):
    torch.manual_seed(0)
    ref = official(**TINY).eval()
    ours = TrackHead(**TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    tokens, query = _inputs()
    images = torch.rand(2, 3, 3, 28, 42)
    with torch.no_grad():
        ref_tracks, ref_vis, ref_conf = ref(tokens, images, 5, query_points=query.clone())
        tracks, vis, conf = ours(tokens, (28, 42), 5, query)
    assert len(tracks) == len(ref_tracks) == 3
    for a, b in zip(tracks, ref_tracks, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vis, ref_vis, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conf, ref_conf, atol=1e-5, rtol=1e-5)


def test_matches_recorded_official_outputs(vggt_goldens):
    """Like ``test_matches_official`` on every run, without the official source: the seed-derived
    weights of ``tools/make_vggt_goldens.py`` give the official head's recorded outputs."""
    tool, golden, meta = vggt_goldens
    assert tool.TRACK_HEAD == TINY
    ours = TrackHead(**TINY).eval()
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert tool.layout_digest(shapes) == meta["track.layout_sha256"]  # the official key names and shapes
    weights = tool.seeded_weights(shapes, gain=tool.TRACK_GAIN, scales=tool.TRACK_SCALES)
    ours.load_state_dict(weights, strict=True)
    t = tool.TRACK_INPUT
    with torch.no_grad():
        tracks, vis, conf = ours(
            list(golden["track.tokens"]), (t["H"], t["W"]), t["patch_start_idx"], golden["track.query"]
        )
    torch.testing.assert_close(torch.stack(tracks), golden["track.tracks"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vis, golden["track.vis"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conf, golden["track.conf"], atol=1e-5, rtol=1e-5)


def test_full_size_keys_match_official(official):
    with torch.device("meta"):
        ref = {k: v.shape for k, v in official(dim_in=2048, patch_size=14).state_dict().items()}
        ours = {k: v.shape for k, v in TrackHead(dim_in=2048, patch_size=14).state_dict().items()}
    assert ours == ref
