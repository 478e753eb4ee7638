"""Training clip length keyed on the optimizer step, decided per batch in the loader.

4Real-Video-V2 (appendix B) trains on 8 views x 29 frames, then on 61 frames from step 4000 for
2000 more: ``{0: 29, 4000: 61}``. The data itself changes length (rather than the model cropping
long clips), so the first phase reads no more frames than it trains on and may use scenes
shorter than the last phase's clips.

The batch sampler runs in the main process and tags each index with the batch's clip length, so
every sample of a batch has one length whatever the worker that loads it, and the switch lands on
the scheduled step exactly: batch ``n`` of an epoch trains step ``start + n // accumulate``
(Lightning steps the optimizer every ``accumulate`` batches, and at the end of an epoch).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch.utils.data import BatchSampler, Dataset, Sampler


def check_schedule(schedule: Mapping[int, int]) -> dict[int, int]:
    """``{step: frames}`` with int keys >= 0 and lengths >= 1 (YAML may give string keys)."""
    out = {int(k): int(v) for k, v in schedule.items()}
    if not out or min(out) < 0 or min(out.values()) < 1:
        raise ValueError(f"clip_schedule: one or more entries step (>= 0): frames (>= 1), got {schedule}")
    return dict(sorted(out.items()))


def frames_at(schedule: Mapping[int, int], step: int, default: int | None = None) -> int | None:
    """The clip length at ``step``: the value of the last key <= ``step`` (``default`` before the
    first key)."""
    frames = [v for k, v in sorted(schedule.items()) if k <= step]
    return frames[-1] if frames else default


class ClipLengths(Dataset):
    """One dataset per clip length: ``ds[(i, frames)]`` is ``datasets[frames][i]``. All have the
    same length (the same samples, read at another length)."""

    def __init__(self, datasets: Mapping[int, Dataset]):
        lengths = {T: len(ds) for T, ds in datasets.items()}
        if not datasets or len(set(lengths.values())) != 1:
            raise ValueError(f"ClipLengths: datasets of one length each, got {lengths}")
        self.datasets = dict(datasets)

    def __len__(self) -> int:
        return len(next(iter(self.datasets.values())))

    def __getitem__(self, key: tuple[int, int]):
        idx, frames = key
        return self.datasets[frames][idx]


class ScheduledBatchSampler(BatchSampler):
    """``sampler``'s indices in batches of ``batch_size``, each index as ``(idx, frames)``: batch
    ``n`` of an epoch gets ``frames_at(schedule, start_step() + n // accumulate, default)``.

    ``start_step`` is read when an epoch starts (the trainer's ``global_step``, which also holds
    a resumed run's step). Subclasses ``BatchSampler`` with ``sampler`` first so Lightning can
    rebuild it around a distributed sampler.

    Its epoch iterator is stateful (``state_dict``/``load_state_dict``, what torchdata's
    ``StatefulDataLoader`` saves in Lightning's checkpoints): the epoch's start step and the batches
    drawn, with the index sampler's own state when it has one (torchdata's ``RandomSampler``), else
    by skipping what was drawn (a deterministic sampler, e.g. ``DistributedSampler``). A run resumed
    mid-epoch then draws the very batches, at the very clip lengths, that it would have.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool,
        schedule: Mapping[int, int],
        default: int | None = None,
        start_step: Callable[[], int] = lambda: 0,
        accumulate: int = 1,
    ):
        super().__init__(sampler, batch_size, drop_last)
        if accumulate < 1:
            raise ValueError(f"ScheduledBatchSampler: accumulate must be >= 1, got {accumulate}")
        self.schedule, self.default = check_schedule(schedule), default
        self.start_step, self.accumulate = start_step, accumulate

    def __iter__(self) -> _ScheduledBatches:
        return _ScheduledBatches(self, self.start_step())


class _ScheduledBatches(Iterator[list[tuple[int, int]]]):
    """One epoch of :class:`ScheduledBatchSampler` (torchdata's ``Stateful`` protocol)."""

    def __init__(self, owner: ScheduledBatchSampler, start: int):
        self.owner, self.start, self.yielded = owner, start, 0
        self.indices = iter(owner.sampler)

    def __iter__(self) -> _ScheduledBatches:
        return self

    def __next__(self) -> list[tuple[int, int]]:
        o = self.owner
        batch = list(itertools.islice(self.indices, o.batch_size))
        if not batch or (o.drop_last and len(batch) < o.batch_size):
            raise StopIteration
        frames = frames_at(o.schedule, self.start + self.yielded // o.accumulate, o.default)
        self.yielded += 1
        return [(idx, frames) for idx in batch]

    def state_dict(self) -> dict[str, Any]:
        stateful = callable(getattr(self.indices, "state_dict", None))
        return {
            "start": self.start,
            "yielded": self.yielded,
            "indices": self.indices.state_dict() if stateful else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start, self.yielded = int(state["start"]), int(state["yielded"])
        self.indices = iter(self.owner.sampler)
        if state.get("indices") is not None and callable(getattr(self.indices, "load_state_dict", None)):
            self.indices.load_state_dict(state["indices"])
        else:  # a sampler without state repeats its epoch's order: skip what was drawn
            for _ in itertools.islice(self.indices, self.yielded * self.owner.batch_size):
                pass
