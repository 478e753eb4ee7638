"""The stage-1 set-up under FSDP2 from a local diffusers checkpoint (``transformer: {path: ...}``):
on two CPU ranks (gloo) only rank 0 reads the checkpoint; rank 1 builds the DiT on the meta device
and receives its shards. The sharded model equals the checkpoint (base weights) and the unsharded
set-up (LoRA, domain embeddings, RoPE tables, every dtype); rank 1's host memory grows by about its
shard, not by the whole model (``benchmarks/sharded_load_memory.py`` measures it at a larger size)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "sharded_load_memory.py"
_spec = importlib.util.spec_from_file_location("sharded_load_memory", _BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # its checkpoint, set-up and memory probe: the same code measured there
HP = {"base_dtype": "bfloat16"}  # bf16 base with Wan's float32 modules: the dtypes must agree too


def _rank(rank: int, root: str, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    import fourdgen.stages.video  # noqa: F401  (imported before measuring, as in the benchmark)

    torch.manual_seed(0)  # LoRA's random A: what seed_everything gives every rank
    with bench.PeakRSS() as rss:
        model = bench.build_sharded(Path(root), 2, **HP)
    grown = torch.tensor([rss.grown_mb])
    state = {n: p.full_tensor() for n, p in model.transformer.named_parameters()}  # collective
    growth = [torch.zeros(1), torch.zeros(1)]
    dist.all_gather(growth, grown)
    if rank == 0:
        torch.save({"params": state, "growth_mb": [float(g) for g in growth]}, out)
    torch.save({n: b.clone() for n, b in model.transformer.named_buffers()}, f"{out}.buffers{rank}")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/test_fsdp.py's _finish: no finalisation with gloo threads alive


def test_sharded_setup_from_a_checkpoint_reads_it_on_rank_0_only(tmp_path):
    size_mb = bench.save_checkpoint(tmp_path, layers=4, heads=8) / 2**20  # ~100 MB float32 on disk
    out = tmp_path / "out.pt"
    mp.spawn(_rank, args=(str(tmp_path), str(tmp_path / "init"), str(out)), nprocs=2)
    got = torch.load(out, weights_only=True)

    from fourdgen.stages.video import VideoDiffusion

    torch.manual_seed(0)
    ref = VideoDiffusion(transformer={"path": str(tmp_path)}, lora_rank=4, lora_alpha=4, **HP)
    ref.configure_model()  # one process, unsharded: what each rank held before
    want = dict(ref.transformer.named_parameters())
    assert set(got["params"]) == set(want)
    for name, p in want.items():
        assert got["params"][name].dtype == p.dtype, name
        assert torch.equal(got["params"][name], p.detach()), name
    file = load_file(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    base = {n.replace("base_layer.", ""): t for n, t in got["params"].items() if "lora_" not in n}
    base.pop("patch_embedding.domain_embedding")
    assert set(base) == set(file)
    for name, t in file.items():  # the checkpoint's values (cast as from_pretrained casts them)
        assert torch.equal(base[name], t.to(base[name].dtype)), name
    for rank in (0, 1):  # replicated RoPE tables: rank 1's were uninitialised memory before the broadcast
        buffers = torch.load(f"{out}.buffers{rank}", weights_only=True)
        for name, b in ref.transformer.named_buffers():
            assert torch.equal(buffers[name], b), (rank, name)
    loaded_mb = sum(p.numel() * p.element_size() for p in want.values()) / 2**20
    r0, r1 = got["growth_mb"]
    # Before: each rank read the whole model (rank 1 grew by about as much as rank 0). Now rank 1
    # holds its half only: it grows by at least half the model less than rank 0.
    msg = f"peak RSS growth: rank 0 {r0:.0f} MB, rank 1 {r1:.0f} MB (checkpoint {size_mb:.0f} MB)"
    assert r0 - r1 > 0.6 * loaded_mb, msg
