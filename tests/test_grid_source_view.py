"""Full-4D's source view: it reaches the mask, training draws it (and the target order) at random,
and outputs keep it as given, with the depth the projection used."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from fourdgen.backbones.wan import build_transformer
from fourdgen.batch import GridBatch
from fourdgen.nn.grid_coupling import DepthProvider, GridInputs, ProjectionGrid, ReferenceGrid
from fourdgen.nn.grid_views import PER_VIEW_FIELDS, permute_views
from fourdgen.stages.grid import GridDiffusion

B, V, T, H, W = 2, 3, 5, 16, 16


def _batch(B=B, V=V, T=T, all_fields=False) -> GridBatch:
    """Every per-view value encodes its clip i and view v as ``10 i + v`` (cameras: fx and the
    translation), so a moved row can be traced to its origin."""
    code = (10 * torch.arange(B)[:, None] + torch.arange(V)[None]).float()  # [B, V]
    K = torch.tensor([[16.0, 0, 8], [0, 16, 8], [0, 0, 1]]).repeat(B, V, 1, 1)
    K[..., 0, 0] += code
    w2c = torch.eye(4).repeat(B, V, T, 1, 1)
    w2c[..., 0, 3] = 0.1 * code[..., None]
    per_cell = code[:, :, None, None, None, None]
    g = torch.Generator().manual_seed(0)
    fields = dict(
        rgb=torch.rand(B, V, T, 3, H, W, generator=g) * 2 - 1,
        K=K,
        w2c=w2c,
        observed=torch.zeros(B, V, T, dtype=torch.bool),
        times=torch.linspace(0, 1, T).expand(B, T),
        view_ids=torch.arange(V).expand(B, V).clone(),
        time_ids=torch.arange(T).expand(B, T),
        depth=(2.0 + per_cell).expand(B, V, T, 1, H, W).clone(),
        text_embeds=torch.randn(B, 8, 32, generator=g),
    )
    fields["observed"][:, 0] = True
    if all_fields:
        lat = per_cell.expand(B, V, 4, 2, 2, 2).clone()
        fields.update(
            xyz=per_cell.expand(B, V, T, 3, H, W).clone(),
            mask=code.to(torch.uint8)[:, :, None, None, None, None].expand(B, V, T, 1, H, W).clone(),
            rgb_latents=lat,
            xyz_latents=lat + 0.5,
            cond_latents=lat + 0.25,
            xyz_center=code[:, :, None, None].expand(B, V, T, 3).clone(),
            xyz_scale=code + 1,
        )
    return GridBatch(**fields).validate()


def _code(b: GridBatch) -> torch.Tensor:
    """``[B, V]`` the ``10 i + v`` code each row's K carries."""
    return b.K[..., 0, 0] - 16.0


# --- the mask ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2])
def test_projection_grid_passes_its_source_view_to_the_mask(k):
    """The layout a ProjectionGrid call sets carries k, so generated tokens see row k's condition
    frames (not view 0's); cameras are relative to row k and row k is the given row."""
    coupling = ProjectionGrid(source_view=k, t_max=21)
    dit = coupling.install(build_transformer(preset="tiny").eval())
    x = torch.randn(1, 16, V * 2, 4, 4)
    inp = GridInputs(x0=x, views=V, cond=torch.randn_like(x), camera=torch.zeros(1, V, 12))
    coupling.predict(dit, x, inp, torch.tensor([500.0]), torch.randn(1, 8, 32), None)
    layout = coupling.state.layout
    assert layout.source_view == k and layout.targets == 2 and layout.frames == 4
    m = coupling.mask.frames(layout)  # [V F, V F]
    for w, v in itertools.product(range(V), range(V)):
        assert bool(m[w * 4, v * 4 + 2]) == (v in (k, w)), (w, v)  # target frame -> condition frame
    b = _batch(B=1)
    cams = ProjectionGrid(source_view=k).prepare(b, torch.zeros(1, V, 16, 2, 2, 2), _encode, 4).camera
    torch.testing.assert_close(cams[:, k], torch.eye(4)[:3].flatten()[None], atol=1e-6, rtol=0)
    assert coupling.given_cells(b.observed, 4)[0].all(-1).tolist() == [v == k for v in range(V)]


def _encode(rgb: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE: ``[B, V, T, 3, H, W]`` -> ``[B, V, 16, F, h, w]`` zeros."""
    B, V, T, _, H, W = rgb.shape
    return rgb.new_zeros(B, V, 16, 1 + (T - 1) // 4, H // 8, W // 8)


def test_source_view_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="source_view=3.*3 views"):
        ProjectionGrid(source_view=3).prepare(_batch(), torch.zeros(B, V, 16, 2, 2, 2), _encode, 4)
    with pytest.raises(ValueError, match="source_view"):
        ProjectionGrid(source_view=-1)


# --- random view order (training only) ----------------------------------------------------------


def test_per_view_fields_are_exactly_the_batchs_view_indexed_fields():
    """Adding a per-view field to GridBatch without listing it here would leave it unpermuted."""
    b = _batch(all_fields=True)
    per_view = {name for name, t in b.tensors().items() if tuple(t.shape[:2]) == (B, V)}
    assert per_view == set(PER_VIEW_FIELDS)


def test_permutation_keeps_every_views_fields_together():
    b = _batch(all_fields=True)
    perm = torch.tensor([[2, 0, 1], [1, 2, 0]])
    out = permute_views(b, perm)
    for i, r in itertools.product(range(B), range(V)):
        src = int(perm[i, r])
        for name in PER_VIEW_FIELDS:
            assert torch.equal(getattr(out, name)[i, r], getattr(b, name)[i, src]), (name, i, r)
    for name in ("times", "time_ids", "text_embeds"):
        assert torch.equal(getattr(out, name), getattr(b, name))
    # rgb travels with its own cameras and depth: the projection of the permuted batch is the
    # permuted projection (each view rendered with its own K / w2c, from the source's own depth).
    order = [1, 0, 2]  # row 1, the source, now holds view 0
    img_p = ProjectionGrid(source_view=1, radius_px=0).project(permute_views(b, torch.tensor([order] * B)))
    img = ProjectionGrid(source_view=0, radius_px=0).project(b)  # view 0 rendered into every view
    torch.testing.assert_close(img_p, img[:, order])
    torch.testing.assert_close(img_p[:, 1], b.rgb[:, 0], atol=1e-5, rtol=0)


def test_random_order_covers_every_view_and_order_and_follows_the_global_seed():
    coupling = ProjectionGrid(source_view=2)
    b = _batch(B=1)

    def draws(n):
        return [tuple(coupling.training_batch(b).view_ids[0].tolist()) for _ in range(n)]

    torch.manual_seed(0)
    first = draws(120)
    assert {d[2] for d in first} == {0, 1, 2}  # every view is the source (row 2) at some step
    assert set(first) == set(itertools.permutations(range(V)))  # and every target order
    torch.manual_seed(0)
    assert draws(120) == first  # seed_everything seeds torch's global RNG: reproducible
    batch2 = coupling.training_batch(_batch())
    assert all(sorted(r) == list(range(V)) for r in batch2.view_ids.tolist())
    off = ProjectionGrid(random_order=False)
    assert off.training_batch(b) is b and ReferenceGrid(reverse_views=0.0).training_batch(b) is b


def _model(coupling, **kw):
    model = GridDiffusion(
        coupling=coupling, lpips_net=None, sample_steps=1, val_sample_steps=1, guidance_scale=1.0, **kw
    )
    model.configure_model()
    return model


def test_random_order_is_applied_in_training_steps_only(monkeypatch):
    model = _model(ProjectionGrid(source_view=1))
    seen: list[tuple[str, list]] = []
    prepare = model.prepare
    stage = {"now": ""}

    def spy(b):
        seen.append((stage["now"], b.view_ids.tolist()))
        return prepare(b)

    monkeypatch.setattr(model, "prepare", spy)
    torch.manual_seed(0)
    b = _batch()
    identity = [list(range(V))] * B
    stage["now"] = "train"
    for _ in range(4):
        model.training_step(b, 0)
    stage["now"] = "eval"
    model.validation_step(b, 0)
    model.predict_step(b, 0)
    train = [ids for s, ids in seen if s == "train"]
    assert len(train) == 4 and any(ids != identity for ids in train)
    assert all(sorted(r) == list(range(V)) for ids in train for r in ids)
    assert [ids for s, ids in seen if s == "eval"] == [identity, identity]
    assert b.view_ids.tolist() == identity  # the caller's batch is not modified


def test_training_view_orders_repeat_per_step_and_rank_whatever_the_global_rng(monkeypatch):
    """The view order of a training clip comes from its own generator of (seed, step, rank, clip):
    a resumed run (a fresh module at the same step) and every DDP rank draw what the uninterrupted
    run did, whatever else consumed the global RNG (loader workers, dropout, other components)."""
    seen: list[list] = []
    step, rank = {"now": 0}, {"now": 0}
    monkeypatch.setattr(GridDiffusion, "global_step", property(lambda self: step["now"]))
    monkeypatch.setattr(GridDiffusion, "global_rank", property(lambda self: rank["now"]))

    def orders(b, drawn_before: int) -> list:
        model = _model(ProjectionGrid(source_view=1))  # a fresh module: a resumed run
        prepare = model.prepare
        monkeypatch.setattr(model, "prepare", lambda x: (seen.append(x.view_ids.tolist()), prepare(x))[1])
        torch.manual_seed(0)  # the run's seed (seed_everything)...
        torch.rand(drawn_before)  # ...and whatever else drew from the global RNG since
        before = torch.get_rng_state()
        model.training_step(b, 0)
        assert torch.equal(torch.get_rng_state(), before)  # the global RNG is not drawn from
        return seen[-1]

    b = _batch(B=4)
    first = orders(b, 0)
    assert orders(b, 123) == first and any(r != list(range(V)) for r in first)
    assert orders(_batch(B=1), 7) == first[:1]  # per clip: independent of the batch size
    rank["now"] = 1
    assert orders(b, 0) != first  # another rank draws other orders...
    step["now"], rank["now"] = 1, 0
    assert orders(b, 0) != first  # ...and so does the next step
    assert all(sorted(r) == list(range(V)) for ids in seen for r in ids)


# --- outputs keep the source row as given -----------------------------------------------------


class RecordingDepth(DepthProvider):
    """The batch's depth of the asked view, plus a record of the calls."""

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, b, view):
        d = b.depth[:, view, :, 0].float() * 1.5
        self.calls.append((view, d))
        return d


@pytest.mark.parametrize("k", [0, 2])
def test_predict_returns_the_input_video_and_its_depth_as_the_source_row(k):
    depth = RecordingDepth()
    model = _model(ProjectionGrid(source_view=k, depth=depth))
    b = _batch()
    clips = model.predict_step(b, 0)
    assert [view for view, _ in depth.calls] == [k]  # one provider call, for the source view
    for i, clip in enumerate(clips):
        assert clip["source_view"] == k
        assert torch.equal(clip["rgb"][k], b.rgb[i, k])  # the input itself, not a VAE round trip
        assert not torch.equal(clip["rgb"][(k + 1) % V], b.rgb[i, (k + 1) % V])
        assert clip["depth"].shape == (T, H, W) and clip["depth"].dtype == torch.float32
        assert torch.equal(clip["depth"], depth.calls[0][1][i])  # the depth the projection used
        assert clip["observed"].all(-1).tolist() == [v == k for v in range(V)]


def test_predict_without_a_projection_has_no_source_view_or_depth():
    model = _model(ReferenceGrid())
    b = dataclasses.replace(_batch(), depth=None)
    b.observed[:, :, 0] = True
    clip = model.predict_step(b, 0)[0]
    assert clip["source_view"] is None and clip["depth"] is None
    x = model.sample(b, num_steps=1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clip["rgb"], model.decode_grid(x, V)[0].float())  # rows as decoded


def test_keep_source_replaces_only_the_source_row():
    model = GridDiffusion(coupling=ProjectionGrid(source_view=1), lpips_net=None)
    b = _batch()
    rgb = torch.zeros_like(b.rgb)
    out = model.keep_source(rgb, b)
    assert torch.equal(out[:, 1], b.rgb[:, 1]) and out[:, [0, 2]].abs().sum() == 0
    assert rgb.abs().sum() == 0  # not in place
    assert GridDiffusion(lpips_net=None).keep_source(rgb, b) is rgb  # ReferenceGrid: no source row
