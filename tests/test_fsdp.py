"""FSDP2 sharding of the Wan DiT (``shard_transformer``): two CPU ranks (gloo) against one
unsharded model, forward and LoRA/new-tensor gradients."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fourdgen.backbones.wan import build_transformer, shard_transformer
from fourdgen.nn.lora import add_lora
from fourdgen.nn.wan_fusion import WidthFusion


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_transformer(preset="tiny")
    fusion = WidthFusion()
    fusion.install(model)
    add_lora(model, rank=4, alpha=4, keep_trainable=fusion.trainable)
    for name, p in model.named_parameters():  # non-zero B and embeddings: gradients everywhere
        if "lora_B" in name or "domain" in name:
            p.data.normal_(0, 0.1)
    return model


def _inputs(rank: int):
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch, as in data parallel
    return dict(
        hidden_states=torch.randn(1, 16, 2, 4, 8, generator=g),
        timestep=torch.tensor([300.0 + 100 * rank]),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        return_dict=False,
    )


def _finish() -> None:
    """End a rank without interpreter finalisation: gloo's worker threads can still hold work
    objects then, and their destructors abort the process (SIGABRT, seen once in CI) after the
    test's results are already written."""
    dist.barrier()  # both ranks done before gloo tears down (an early exit aborted the peer)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    model = shard_transformer(_model(), init_device_mesh("cpu", (world,)), param_dtype=None)
    out = model(**_inputs(rank))[0]
    out.square().mean().backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    if rank == 0:
        torch.save({"out": out.detach(), "grads": grads, "sharded": sharded}, out_file)
    _finish()


def test_sharded_dit_matches_unsharded(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=world)
    got = torch.load(tmp_path / "out.pt")
    ref = _model()
    assert got["sharded"] == len(list(ref.parameters()))  # every parameter is a DTensor shard
    losses = []
    for rank in range(world):
        out = ref(**_inputs(rank))[0]
        if rank == 0:
            torch.testing.assert_close(got["out"], out.detach(), rtol=1e-5, atol=1e-5)
        losses.append(out.square().mean())
    (sum(losses) / world).backward()  # FSDP averages gradients over ranks
    trainable = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert set(got["grads"]) == set(trainable) and any("domain" in n for n in trainable)
    for name, p in trainable.items():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _grid_model():
    """Full-4D's grid DiT: its attention processors call sibling modules of the sharded block."""
    from fourdgen.nn.grid_coupling import ProjectionGrid

    torch.manual_seed(0)
    model = build_transformer(preset="tiny")
    coupling = ProjectionGrid(backend="dense")
    coupling.install(model)
    for name, p in model.named_parameters():
        p.requires_grad_(any(k in name for k in coupling.trainable))
        if "fused_proj" in name or "camera_encoder" in name:
            p.data.normal_(0, 0.05)  # non-zero so every trainable tensor gets a gradient
    return model, coupling


def _grid_predict(model, coupling, rank: int):
    from fourdgen.nn.grid_coupling import GridInputs

    g = torch.Generator().manual_seed(200 + rank)
    x = torch.randn(1, 16, 4, 4, 4, generator=g)  # 2 views x 2 frames x 2x2 tokens
    inp = GridInputs(
        x0=x,
        views=2,
        cond=torch.randn(1, 16, 4, 4, 4, generator=g),
        camera=torch.randn(1, 2, 12, generator=g),
    )
    return coupling.predict(model, x, inp, torch.tensor([400.0]), torch.randn(1, 5, 32, generator=g), None)


def _grid_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    model, coupling = _grid_model()
    shard_transformer(model, init_device_mesh("cpu", (world,)), param_dtype=None)
    out = _grid_predict(model, coupling, rank)
    out.square().mean().backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save({"out": out.detach(), "grads": grads}, out_file)
    _finish()


def test_sharded_full4d_grid_dit_matches_unsharded(tmp_path):
    world = 2
    mp.spawn(_grid_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=world)
    got = torch.load(tmp_path / "out.pt")
    ref, coupling = _grid_model()
    losses = []
    for rank in range(world):
        out = _grid_predict(ref, coupling, rank)
        if rank == 0:
            torch.testing.assert_close(got["out"], out.detach(), rtol=1e-5, atol=1e-5)
        losses.append(out.square().mean())
    (sum(losses) / world).backward()
    trainable = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert set(got["grads"]) == set(trainable) and any("fused_attn" in n for n in trainable)
    for name, p in trainable.items():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _recon_model():
    """The tiny 4Real reconstructor with live temporal blocks and Gaussian head; the Gaussian head
    and temporal blocks train (the dynamic stage), the rest is frozen."""
    from fourdgen.models.gaussian_recon import GaussianReconstructor

    torch.manual_seed(0)
    model = GaussianReconstructor("tiny")
    for blk in model.vggt.aggregator.temporal_blocks:
        torch.nn.init.normal_(blk.attn.proj.weight, std=0.1)
    torch.nn.init.normal_(model.gaussian_head.last_conv.weight, std=0.1)
    model.requires_grad_(False)
    model.gaussian_head.requires_grad_(True)
    model.vggt.aggregator.temporal_blocks.requires_grad_(True)
    return model


def _recon_loss(model, rank: int):
    g = torch.Generator().manual_seed(200 + rank)
    x = torch.rand(1, 2, 2, 3, 28, 28, generator=g)
    pred = model(x)
    K, w2c = model.target_cameras(x[:, 0, 0], x[:, 1:, 0])
    loss = pred.gaussians["means"].square().mean() + pred.gaussians["sh0"].square().mean()
    return loss, w2c


def _recon_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from fourdgen.models.gaussian_recon import shard_reconstructor

    torch.set_num_threads(1)
    model = shard_reconstructor(_recon_model(), init_device_mesh("cpu", (world,)))
    loss, w2c = _recon_loss(model, rank)
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    if rank == 0:
        torch.save({"loss": loss.detach(), "w2c": w2c, "grads": grads, "sharded": sharded}, out_file)
    _finish()


def test_sharded_reconstructor_matches_unsharded(tmp_path):
    """Stage 2 under FSDP2 (per-block units, the target-camera pass entering the aggregator and the
    camera head directly): same loss, target cameras and gradients as one unsharded model."""
    world = 2
    mp.spawn(_recon_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=world)
    got = torch.load(tmp_path / "out.pt")
    ref = _recon_model()
    assert got["sharded"] == len(list(ref.parameters()))
    losses = []
    for rank in range(world):
        loss, w2c = _recon_loss(ref, rank)
        if rank == 0:
            torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["w2c"], w2c, rtol=1e-5, atol=1e-5)
        losses.append(loss)
    (sum(losses) / world).backward()
    trainable = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert set(got["grads"]) == set(trainable) and any("temporal_blocks" in n for n in trainable)
    for name, p in trainable.items():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _clip_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from fourdgen.stages.common import clip_grad_norm

    torch.set_num_threads(1)
    model = shard_transformer(_model(), init_device_mesh("cpu", (world,)), param_dtype=None)
    model(**_inputs(rank))[0].square().mean().backward()
    norm = clip_grad_norm([p for p in model.parameters() if p.requires_grad], 0.05)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save({"norm": norm, "grads": grads}, out_file)
    _finish()


def test_gradient_clipping_under_fsdp2_uses_the_global_norm(tmp_path):
    """4DNeX clips at a global norm: on two FSDP2 ranks the clipped shards equal one unsharded model
    clipped by hand (norm over every trainable gradient, factor min(1, max / (norm + 1e-6)))."""
    world = 2
    mp.spawn(_clip_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=world)
    got = torch.load(tmp_path / "out.pt")
    ref = _model()
    (sum(ref(**_inputs(r))[0].square().mean() for r in range(world)) / world).backward()
    trainable = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    total = sum(float(p.grad.double().square().sum()) for p in trainable.values()) ** 0.5
    assert total > 0.05  # clipping is active
    factor = min(1.0, 0.05 / (total + 1e-6))
    torch.testing.assert_close(float(got["norm"]), total, rtol=1e-4, atol=0)
    for name, p in trainable.items():
        torch.testing.assert_close(got["grads"][name], p.grad * factor, rtol=1e-4, atol=1e-7, msg=name)


def _lightning_clip_worker(rank: int, tmp: str, out_file: str) -> None:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    from fourdgen.stages.video import VideoDiffusion
    from tests.test_video import _dm

    torch.set_num_threads(1)
    model = VideoDiffusion(lora_rank=4, lora_alpha=4, lr=1e-3, grad_clip_norm=1e-3)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        default_root_dir=tmp,
    )
    from pathlib import Path

    trainer.fit(model, _dm(Path(tmp)))
    sharded = all(type(p).__name__ == "DTensor" for p in model.transformer.parameters())
    torch.save({"sharded": sharded, "grad_norm": trainer.callback_metrics["train/grad_norm"]}, out_file)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_grad_clip_norm_through_model_parallel_strategy(tmp_path):
    """The stage's ``grad_clip_norm`` runs inside Lightning's FSDP2 strategy (DTensor parameters; a
    1-rank CPU mesh in its own process) and logs the pre-clipping norm."""
    mp.spawn(_lightning_clip_worker, args=(str(tmp_path), str(tmp_path / "out.pt")), nprocs=1)
    got = torch.load(tmp_path / "out.pt")
    assert got["sharded"] and torch.isfinite(got["grad_norm"]) and got["grad_norm"] > 1e-3
