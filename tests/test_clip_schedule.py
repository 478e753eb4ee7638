"""The training clip-length schedule (4Real-Video-V2 appendix B: 29 frames, then 61 from step 4000):
the lookup, the batch sampler's step arithmetic, and a Lightning run whose batches change length
on the scheduled step."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from torch.utils.data import SequentialSampler

from fourdgen.backbones.text import HashTextEncoder
from fourdgen.batch import GridBatch
from fourdgen.data.clip_schedule import ClipLengths, ScheduledBatchSampler, check_schedule, frames_at
from fourdgen.data.multiview import MultiViewDataModule
from fourdgen.data.synthetic import SyntheticConfig

SYN = SyntheticConfig(num_views=2, num_frames=5, height=16, width=16, num_objects=1, supersample=1, seed=3)


def test_frames_at_and_checks():
    paper = check_schedule({"0": 29, "4000": 61})  # YAML may give string keys
    assert paper == {0: 29, 4000: 61}
    assert [frames_at(paper, s) for s in (0, 3999, 4000, 5999)] == [29, 29, 61, 61]
    assert frames_at({10: 5}, 9, default=3) == 3 and frames_at({10: 5}, 9) is None
    for bad in ({}, {-1: 5}, {0: 0}):
        with pytest.raises(ValueError, match="clip_schedule"):
            check_schedule(bad)


def test_batch_sampler_tags_each_batch_with_its_steps_length():
    """Batch n trains step start + n // accumulate; a plain loop over the steps is the reference."""
    schedule, start, acc, bs = {0: 1, 4: 5, 6: 9}, 3, 2, 3
    sampler = ScheduledBatchSampler(
        SequentialSampler(range(20)), bs, False, schedule, start_step=lambda: start, accumulate=acc
    )
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7 and [i for b in batches for i, _ in b] == list(range(20))
    for n, batch in enumerate(batches):
        step = start + n // acc
        want = 9 if step >= 6 else 5 if step >= 4 else 1
        assert {frames for _, frames in batch} == {want}, (n, batch)
    ds = ClipLengths({1: ["a1", "b1"], 5: ["a5", "b5"]})
    assert len(ds) == 2 and ds[(1, 5)] == "b5"
    with pytest.raises(ValueError, match="one length"):
        ClipLengths({1: [0], 5: [0, 1]})


class _Recorder(L.LightningModule):
    """Records (global_step, clip frames) of every training batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        b = GridBatch.coerce(batch)
        self.seen.append((self.global_step, b.shape[2]))
        return (self.w - b.rgb.mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:.*only 1 scene", "ignore:.*does not have many workers")
@pytest.mark.parametrize("accumulate", [1, 2])
def test_datamodule_schedule_switches_clip_length_on_the_step(tmp_path, accumulate):
    """``clip_schedule={0: 1, 3: 5}``: steps 0-2 train 1-frame clips, then 5; epochs of 2 batches
    (the next epoch reads the trainer's step) and gradient accumulation keep the switch on step 3.
    Evaluation keeps ``num_frames``."""
    dm = MultiViewDataModule(
        root=str(tmp_path / "scenes"),
        num_views=2,
        num_frames=5,
        height=16,
        width=16,
        crop="center",
        mix=(1.0, 0.0, 0.0, 1.0),
        clip_schedule={0: 1, 3: 5},
        text_encoder=HashTextEncoder(dim=8, length=4),
        synthetic=dataclasses.replace(SYN),
        samples_per_scene=4,
        batch_size=2,
    )
    model = _Recorder()
    trainer = L.Trainer(
        max_steps=5,
        accelerator="cpu",
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    steps = [s for s in range(5) for _ in range(accumulate)]
    assert model.seen == [(s, 1 if s < 3 else 5) for s in steps]
    assert GridBatch.coerce(next(iter(dm.val_dataloader()))).shape[2] == 5


@pytest.mark.filterwarnings("ignore:.*only 1 scene", "ignore:.*does not have many workers")
def test_scheduled_loader_resumes_mid_epoch_with_the_same_samples_and_lengths(tmp_path, monkeypatch):
    """A fit checkpointed mid-epoch (step 2 of 4-batch epochs) and resumed under another global seed
    trains the very samples, at the very clip lengths, of the uninterrupted run: across the
    schedule's switch (step 3) and into the next epoch. The loader and its batch sampler are
    stateful (torchdata), so Lightning's checkpoint holds their position and shuffled order."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    drawn: list[tuple[int, int]] = []  # (sample index, frames) in the order the loader fetched them
    get = ClipLengths.__getitem__
    monkeypatch.setattr(ClipLengths, "__getitem__", lambda self, key: (drawn.append(key), get(self, key))[1])

    def fit(seed: int, ckpt_path=None) -> list[tuple[int, int, int]]:
        L.seed_everything(seed)
        drawn.clear()
        dm = MultiViewDataModule(
            root=str(tmp_path / "scenes"),
            num_views=2,
            num_frames=5,
            height=16,
            width=16,
            crop="center",
            clip_schedule={0: 1, 3: 5},
            text_encoder=HashTextEncoder(dim=8, length=4),
            synthetic=dataclasses.replace(SYN),
            samples_per_scene=4,
        )
        model = _Recorder()
        every = ModelCheckpoint(
            dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1, filename="{step}"
        )
        trainer = L.Trainer(
            max_steps=7,
            accelerator="cpu",
            logger=False,
            callbacks=[every],
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
        )
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return [(step, idx, frames) for (step, frames), (idx, _) in zip(model.seen, drawn, strict=True)]

    ref = fit(0)
    assert [s for s, _, _ in ref] == list(range(7)) and {f for s, _, f in ref if s >= 3} == {5}
    resumed = fit(1, ckpt_path=tmp_path / "ck" / "step=2.ckpt")
    assert resumed == ref[2:]


def test_batch_sampler_state_without_a_stateful_index_sampler_skips_what_was_drawn():
    """A deterministic index sampler without state (a DistributedSampler, here a sequential one):
    the restored epoch skips the batches drawn and keeps the saved epoch's start step."""
    sampler = ScheduledBatchSampler(
        SequentialSampler(range(10)), 3, False, {0: 1, 2: 5}, start_step=lambda: 1
    )
    it = iter(sampler)
    head = [next(it)]
    state = it.state_dict()
    assert state == {"start": 1, "yielded": 1, "indices": None}
    tail = list(it)
    later = ScheduledBatchSampler(SequentialSampler(range(10)), 3, False, {0: 1, 2: 5}, start_step=lambda: 7)
    restored = iter(later)
    restored.load_state_dict(state)
    assert list(restored) == tail and [b[0][1] for b in head + tail] == [1, 5, 5, 5]
