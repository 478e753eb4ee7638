"""Bad user files in the DataModules that read them: skipped with a warning and a count, or the
recipe's ``on_bad_sample: error``; loader workers (``num_workers=2``) never hang or die on them.

Four scenes (2 views x 5 frames, 16 x 16, with depth): ``s0`` and ``s3`` good, ``s1`` with a
malformed ``scene.json``, ``s2`` with a truncated frame (view 0, frame 1) whose header still reads.
GridDataModule's own case is in ``test_reliability.py``; here its subclasses (the multi-view mixture
of stage 1b, the pointmap clips of stage 1 with their caches) and the prediction images.
"""

from __future__ import annotations

import contextlib
import faulthandler
from pathlib import Path

import numpy as np
import pytest
import torch

from fourdgen.backbones.text import HashTextEncoder
from fourdgen.batch import GridBatch
from fourdgen.data.scene import SceneFormatError
from fourdgen.data.scene_writer import write_scene
from fourdgen.errors import FileFormatError
from fourdgen.io import read_cache

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*only \\d scene")
V, T, H, W = 2, 5, 16, 16


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("scenes")
    w2c = torch.eye(4).repeat(V, T, 1, 1)
    w2c[..., 2, 3] = 3.0
    K = torch.tensor([[12.0, 0, W / 2], [0, 12.0, H / 2], [0, 0, 1]]).repeat(V, 1, 1)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        rgb = rng.integers(0, 255, (V, T, H, W, 3), dtype=np.uint8)
        depth = np.full((V, T, H, W), 2.0 + i, np.float32)
        paths.append(write_scene(root / f"s{i}", rgb, K, w2c, depth=depth, caption=f"scene {i}"))
    (root / "s1" / "scene.json").write_text('{"format": "fourdgen-scene", "width": ')
    frame = sorted((root / "s2").rglob("*.png"))[1]  # view 0, frame 1
    data = frame.read_bytes()
    frame.write_bytes(data[: data.index(b"IDAT") + 6])
    return paths


@contextlib.contextmanager
def no_hang(seconds: float = 90):
    """A hung loader worker would stall the suite: dump the stacks and exit instead."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _all_splits(dm, paths):
    dm.setup("fit")
    dm.splits = {k: list(paths) for k in ("train", "val", "test")}  # every scene in training
    return dm


def _multiview(root, **kw):
    from fourdgen.data.multiview import MultiViewDataModule

    args = dict(
        root=str(root), num_views=V, num_frames=T, height=H, width=W, crop="center", samples_per_scene=3
    )
    return MultiViewDataModule(**args, text_encoder=HashTextEncoder(dim=8, length=4), **{**kw})


@pytest.mark.parametrize("mix", [(1.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.25, 0.25)], ids=["grids", "mixture"])
def test_multiview_datamodule_skips_bad_scenes_in_loader_workers(scenes, mix):
    dm = _all_splits(_multiview(scenes[0].parent, mix=mix, num_workers=2), scenes)
    with pytest.warns(UserWarning, match=r"skipping a bad sample \(1 so far.*s1.scene\.json.*valid JSON"):
        loader = dm.train_dataloader()
    with no_hang():
        ids = [s for b in loader for s in GridBatch.coerce(b).scene_id]
    assert len(ids) == len(loader.dataset) >= 3 * 3  # a whole epoch: no sample lost to a dead worker
    assert not any(s.startswith("s1") for s in ids)
    if mix[0] == 1.0:  # every grid reads frame 1 of view 0: s2's samples went to the next scene
        assert set(ids) <= {"s0", "s3"} and "s2" not in ids
    strict = _all_splits(_multiview(scenes[0].parent, mix=mix, on_bad_sample="error"), scenes)
    with pytest.raises(SceneFormatError, match=r"s1.scene\.json.*'<json>'"):
        strict.train_dataloader()
    # Only s2, whose frame 1 of view 0 is cut short. The mixture draws each sample's source from
    # torch's RNG, and its homography and static sources need not read that frame: seeded, and a
    # few epochs, so that some draw reads it whatever ran before (unseeded, 3 draws missed it).
    strict.splits["train"] = [scenes[2]]
    torch.manual_seed(0)
    with pytest.raises(SceneFormatError, match=r"s2.scene\.json: field 'views\[0\]\.rgb\[1\]'"):
        for _ in range(10):
            for _ in strict.train_dataloader():
                pass


def _pointmaps(root, cache, **kw):
    from fourdgen.data.pointmaps import PointmapDataModule

    return PointmapDataModule(
        root=str(root),
        num_frames=T,
        height=H,
        width=W,
        cache_dir=str(cache),
        vae={"preset": "tiny"},
        text_encoder=HashTextEncoder(dim=8, length=4),
        samples_per_scene=2,
        **kw,
    )


def test_pointmap_datamodule_skips_bad_scenes_and_recovers_damaged_caches(scenes, tmp_path, monkeypatch):
    from fourdgen.data.datamodules import GridDataModule

    # Only the four scenes, in every split (prepare_data's own setup() would split them).
    monkeypatch.setattr(
        GridDataModule, "split_scenes", lambda self: {k: scenes for k in ("train", "val", "test")}
    )
    cache = tmp_path / "cache"
    dm = _pointmaps(scenes[0].parent, cache, num_workers=2)
    with pytest.warns(UserWarning, match=r"skipping a bad sample") as seen:
        dm.prepare_data()  # fills the text and latent caches of the readable clips
    assert any("s1" in str(w.message) for w in seen) and any("rgb[1]" in str(w.message) for w in seen)
    latents, texts = sorted((cache / "latents").iterdir()), sorted((cache / "text").iterdir())
    assert {p.name.split("-")[0] for p in latents} == {"s0", "s3"}
    for f in (latents[0], texts[0]):  # a disk fault / an interrupted copy of the cache
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    dm.setup("fit")
    with no_hang():
        batches = [GridBatch.coerce(b) for b in dm.train_dataloader()]
    assert len(batches) == 3 * 2 and {b.scene_id[0] for b in batches} <= {"s0", "s3"}
    assert all(b.rgb_latents is not None and b.text_embeds is not None for b in batches)
    assert read_cache(latents[0]) is not None and read_cache(texts[0]) is not None  # rewritten whole
    with pytest.warns(UserWarning, match=r"unreadable cache file"):
        assert read_cache(texts[1], ("no_such_tensor",)) is None
    with pytest.raises(SceneFormatError, match=r"s1.scene\.json"):
        _pointmaps(scenes[0].parent, tmp_path / "c2", on_bad_sample="error").prepare_data()


def test_prediction_images_skip_undecodable_files(tmp_path):
    import imageio.v2 as iio

    from fourdgen.data.images import ImagePromptDataModule

    folder = tmp_path / "inputs"
    folder.mkdir()
    iio.imwrite(folder / "a_good.png", np.full((12, 20, 3), 200, np.uint8))
    iio.imwrite(folder / "b_deep.png", np.full((12, 20), 40000, np.uint16))  # 16-bit: scaled, kept
    data = (folder / "a_good.png").read_bytes()
    (folder / "c_truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "d_text.jpg").write_text("not an image")
    kw = dict(images=str(folder), prompts=["a", "b", "c", "d"], num_frames=3, height=8, width=8)
    dm = ImagePromptDataModule(**kw, text_encoder=HashTextEncoder(dim=8, length=4), num_workers=2)
    with pytest.warns(UserWarning, match=r"skipping a bad sample \(\d so far\): \S+c_truncated\.png"):
        dm.setup("predict")
    assert [p.name for p in dm.images] == ["a_good.png", "b_deep.png"] and dm.prompts == ["a", "b"]
    assert dm.skipped == 2
    with no_hang():
        rgb = [GridBatch.coerce(b).rgb[0, 0, 0] for b in dm.predict_dataloader()]
    assert len(rgb) == 2 and abs(float(rgb[1].mean()) - (40000 / 65535 * 2 - 1)) < 0.02
    strict = ImagePromptDataModule(**kw, on_bad_sample="error")
    with pytest.raises(FileFormatError, match=r"c_truncated\.png: field '<image>': expected a readable"):
        strict.setup("predict")
