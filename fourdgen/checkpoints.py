"""Lightning checkpoints in either layout, read in one process without a GPU or a process group.

``ModelParallelStrategy`` (FSDP2) saves a *folder* by default (``save_distributed_checkpoint``):
torch.distributed.checkpoint's ``.metadata`` and one ``__<rank>_0.distcp`` per rank (model and
optimizer tensors, keyed by parameter name), and Lightning's ``meta.pt`` (step, loops, LR schedulers,
hyper-parameters). Every other strategy saves one ``torch.save`` file whose optimizer states are
numbered by position (``optimizer_states``). Lightning loads a folder only under its sharding
strategies. Its documented route elsewhere is to consolidate first
(``python -m lightning.fabric.utilities.consolidate_checkpoint <folder>``): that gives one file with
the tensors in full, but its optimizer states stay name-keyed (``optimizer_0``), which a
single-process Trainer does not restore. :func:`read_checkpoint` does the consolidation (Lightning's
own function) and that last step, in memory; :class:`ConsolidatingCheckpointIO` makes every
non-sharding strategy (one process, DDP) resume from a folder or a consolidated file that way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

META_FILE = "meta.pt"  # Lightning's non-tensor part of a sharded checkpoint (_METADATA_FILENAME)
CONSOLIDATE = "python -m lightning.fabric.utilities.consolidate_checkpoint"


def is_sharded_checkpoint(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a sharded checkpoint folder as Lightning writes one (DCP + ``meta.pt``)."""
    return path is not None and Path(path).is_dir() and (Path(path) / META_FILE).is_file()


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Everything but the tensors' values, cheaply: ``meta.pt`` of a folder (a few KB), or the file
    memory-mapped (its tensors are not read)."""
    p = Path(path)
    if p.is_dir():
        return torch.load(p / META_FILE, map_location="cpu", weights_only=True)
    return torch.load(p, map_location="cpu", weights_only=True, mmap=True)


def positional_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state (``get_optimizer_state_dict``'s, which DCP saves) in
    ``torch.optim.Optimizer.state_dict``'s layout: parameters numbered in param-group order, the
    order by which ``Optimizer.load_state_dict`` matches them to the new optimizer's parameters."""
    ids: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        groups.append({**group, "params": [ids.setdefault(name, len(ids)) for name in group["params"]]})
    return {"state": {ids[name]: s for name, s in state["state"].items()}, "param_groups": groups}


def single_file_layout(ckpt: dict[str, Any]) -> dict[str, Any]:
    """``ckpt`` as a single-process Trainer restores it: name-keyed ``optimizer_<i>`` entries (a
    consolidated sharded checkpoint) become the positional ``optimizer_states`` list."""
    keys = sorted((k for k in ckpt if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k[10:]))
    if keys and "optimizer_states" not in ckpt:
        ckpt["optimizer_states"] = [positional_optimizer_state(ckpt.pop(k)) for k in keys]
    return ckpt


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint (file or sharded folder) as one dict in the single-file layout, full
    tensors on the CPU. A folder is consolidated with Lightning's own function (what
    ``consolidate_checkpoint`` saves), which reads every shard: fourdgen's checkpoints hold the trained
    tensors only, so this is the adapter and its optimizer state, not the frozen base."""
    p = Path(path)
    if is_sharded_checkpoint(p):
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return single_file_layout(_load_distributed_checkpoint(p))
    return single_file_layout(torch.load(p, map_location="cpu", weights_only=True, mmap=True))


class ConsolidatingCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that also resumes from a sharded folder (or its consolidated
    file) under a strategy that does not shard: one process, or DDP. The CLI installs it; a Trainer
    built by hand takes it as ``plugins=[ConsolidatingCheckpointIO()]``."""

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        if is_sharded_checkpoint(path):
            rank_zero_info(
                f"fourdgen: {path} is a sharded checkpoint (ModelParallelStrategy); consolidating it in "
                f"memory for this run ({CONSOLIDATE} {path} writes the same as one file)"
            )
            return read_checkpoint(path)
        kwargs = {} if map_location is None else {"map_location": map_location}
        return single_file_layout(super().load_checkpoint(path, weights_only=weights_only, **kwargs))
