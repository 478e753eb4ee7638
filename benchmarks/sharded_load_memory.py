"""Peak host memory per rank of the stage-1 set-up (``configure_model``) under FSDP2, with the base DiT
read from a local diffusers checkpoint (``transformer: {path: ...}``), on CPU ranks (gloo).

Saves a Wan DiT of ``--layers`` blocks of width ``--heads`` x 64 (float32) once, then each of
``--ranks`` processes builds the 4DNeX stage over it (width fusion, LoRA) on a 1-D mesh, as
Lightning's ``ModelParallelStrategy`` would. Reports per rank the growth of the process's peak RSS
(``ru_maxrss``) across ``configure_model``, next to the checkpoint's size and its share per rank:

    python benchmarks/sharded_load_memory.py --layers 12 --heads 8 --out /tmp/wan_mem
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def save_checkpoint(root: Path, layers: int, heads: int) -> int:
    """The DiT of the stage's channel layout under ``root/transformer``; its size in bytes."""
    from fourdgen.backbones.wan import build_transformer, build_vae
    from fourdgen.stages.video import VideoDiffusion

    vae = build_vae(preset="tiny")
    cin = vae.config.z_dim + VideoDiffusion().input_channels(vae)
    overrides = dict(num_layers=layers, num_attention_heads=heads, attention_head_dim=64, ffn_dim=heads * 256)
    model = build_transformer(preset="tiny", overrides={**overrides, "in_channels": cin}, seed=1)
    if not (root / "transformer" / "config.json").is_file():
        model.save_pretrained(root / "transformer")
    return sum(p.numel() * p.element_size() for p in model.parameters())


class PeakRSS:
    """Peak resident set size above the one at entry, sampled every 2 ms by a thread (the process's
    ``ru_maxrss`` may have peaked earlier, at import time, above what a set-up adds)."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.start = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def grown_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def build_sharded(root: Path, world: int, **hparams):
    """The stage over the checkpoint at ``root``, set up on this rank's FSDP2 mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    from fourdgen.stages.video import VideoDiffusion

    model = VideoDiffusion(transformer={"path": str(root)}, lora_rank=4, lora_alpha=4, **hparams)
    model._device_mesh = init_device_mesh(  # what ModelParallelStrategy hands configure_model
        "cpu", (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel")
    )
    model.configure_model()
    return model


def _rank(rank: int, world: int, root: str, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import fourdgen.stages.video  # noqa: F401  (imports before the baseline)

    with PeakRSS() as rss:
        model = build_sharded(Path(root), world)
    local = sum(p.to_local().numel() * p.element_size() for p in model.transformer.parameters())
    result = {"rank": rank, "peak_rss_growth_mb": rss.grown_mb, "local_shards_mb": local / 2**20}
    dist.barrier()
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as tests/test_fsdp.py: no interpreter finalisation with gloo threads alive


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", default="/tmp/fourdgen_sharded_load")
    args = p.parse_args()
    root = Path(args.out)
    size = save_checkpoint(root, args.layers, args.heads)
    init = root / "init"
    init.unlink(missing_ok=True)
    mp.spawn(_rank, args=(args.ranks, str(root), str(init), str(root / "result")), nprocs=args.ranks)
    mb = size / 2**20
    print(f"checkpoint {mb:.0f} MB (float32), {args.ranks} ranks: share {mb / args.ranks:.0f} MB")
    for r in range(args.ranks):
        res = json.loads((root / f"result.{r}.json").read_text())
        grow, local = res["peak_rss_growth_mb"], res["local_shards_mb"]
        print(f"rank {r}: peak RSS +{grow:.0f} MB during configure_model, local shards {local:.0f} MB")


if __name__ == "__main__":
    main()
