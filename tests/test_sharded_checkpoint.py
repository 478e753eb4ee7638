"""Sharded (FSDP2) checkpoints through ``fourdgen fit``: the tiny 4DNeX stage (width fusion, LoRA)
trained under Lightning's ``ModelParallelStrategy`` on two CPU ranks (gloo) saves folders, which

- resume on two ranks with the losses and weights of the uninterrupted run,
- resume in one process (consolidated in memory; also Lightning's consolidated file),
- export their LoRA adapter on the CPU, equal to the trained one.

The two ranks are started by ``mp.spawn`` with the environment torchrun would give them, and each
runs the CLI in-process (once for the uninterrupted run, once for the resumed one), so the two-rank
runs share one process start-up. ``tests/test_launch.py`` starts ranks through torchrun and srun.
"""

from __future__ import annotations

import csv
import os
import runpy
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.fabric.utilities.load import _load_distributed_checkpoint

from fourdgen.checkpoints import read_checkpoint
from fourdgen.cli import FourDGenCLI, checkpoint_step
from fourdgen.main import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "lightning_configs" / "tiny" / "video.yaml")
LORA = ["--model.init_args.lora_rank=4", "--model.init_args.lora_alpha=8"]  # scale 2: exports bake it in
FSDP2 = [
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=2",
    "--trainer.strategy.tensor_parallel_size=1",
]


def fit_args(out: Path, steps: int, devices: int, *extra: str) -> list[str]:
    """``fourdgen fit`` of the tiny 4DNeX recipe with LoRA, a checkpoint every 2 steps (all kept),
    losses in ``out/lightning_logs/version_*/metrics.csv``, its own data under ``out``."""
    return [
        "fit",
        f"--config={RECIPE}",
        *LORA,
        "--trainer.accelerator=cpu",
        f"--trainer.devices={devices}",
        *(FSDP2 if devices > 1 else []),
        f"--trainer.max_steps={steps}",
        "--trainer.check_val_every_n_epoch=1000",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={out}",
        "--trainer.log_every_n_steps=1",
        "--trainer.callbacks=fourdgen.callbacks.checkpoint.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={out}/ck",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.every_n_train_steps=2",
        f"--data.init_args.root={out}/scenes",
        f"--data.init_args.cache_dir={out}/cache",
        "--num_threads=1",
        *extra,
    ]


def losses(run: Path) -> dict[int, float]:
    """``train/loss`` by step (rank 0's; every version dir of the run)."""
    out = {}
    for f in sorted(run.glob("lightning_logs/version_*/metrics.csv")):
        rows = csv.DictReader(f.open())
        out.update({int(r["step"]): float(r["train/loss"]) for r in rows if r["train/loss"]})
    return out


def _rank(rank: int, port: int, runs: list[list[str]]) -> None:
    # What torchrun sets: Lightning then takes the processes as launched (no re-launch of sys.argv).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank))
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    for args in runs:
        FourDGenCLI(args=args)
    import torch.distributed as dist

    # As tests/test_fsdp.py's _finish: no interpreter finalisation with gloo threads alive (SIGABRT).
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _two_rank_runs(root: Path) -> None:
    ref, res = root / "ref", root / "resumed"
    runs = [
        fit_args(ref, 4, 2),  # uninterrupted: step=2 and step=4 folders, last.ckpt (step 4)
        fit_args(res, 4, 2, f"--ckpt_path={ref / 'ck' / 'epoch=0-step=2.ckpt'}"),
    ]
    mp.spawn(_rank, args=(find_free_network_port(), runs), nprocs=2)


@pytest.fixture(scope="session")
def sharded_runs(tmp_path_factory, worker_id) -> Path:
    """Both two-rank runs, made once per test session: xdist workers share them (file lock)."""
    if worker_id == "master":
        root = tmp_path_factory.mktemp("sharded")
        _two_rank_runs(root)
        return root
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp().parent
    root = base / "sharded_runs"
    with FileLock(str(base / "sharded_runs.lock")):
        if not (root / "done").is_file():
            _two_rank_runs(root)
            (root / "done").touch()
    return root


def test_sharded_checkpoint_resumes_on_two_ranks_with_the_same_losses(sharded_runs):
    ref, res = sharded_runs / "ref", sharded_runs / "resumed"
    ck = ref / "ck"
    assert sorted(p.name for p in ck.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    for folder in ck.iterdir():  # one shard per rank, Lightning's metadata, written whole (no .partial)
        assert {p.name for p in folder.iterdir()} == {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"}
    assert checkpoint_step(ck / "epoch=0-step=2.ckpt") == 2 and checkpoint_step(res / "ck" / "last.ckpt") == 4
    want, got = losses(ref), losses(res)
    assert sorted(want) == [0, 1, 2, 3] and sorted(got) == [2, 3], (want, got)
    for step in (2, 3):
        assert got[step] == want[step], f"step {step}: resumed {got[step]} vs uninterrupted {want[step]}"
    a, b = read_checkpoint(ck / "last.ckpt"), read_checkpoint(res / "ck" / "last.ckpt")
    assert set(a["state_dict"]) == set(b["state_dict"]) and any("lora_B" in k for k in a["state_dict"])
    # Only what trains is saved (the frozen base comes back from the recipe), sharded or not.
    assert all("lora_" in k or "domain_embedding" in k for k in a["state_dict"]), sorted(a["state_dict"])
    for name, value in a["state_dict"].items():  # both ranks' gradients reach every trained tensor
        assert torch.equal(value, b["state_dict"][name]), name
    first = read_checkpoint(ck / "epoch=0-step=2.ckpt")["state_dict"]
    assert not all(torch.equal(first[k], v) for k, v in a["state_dict"].items())  # it did train on


class RecordTrainStart(L.Callback):
    """Trainable weights and optimizer state by parameter name as training starts (after restoring)."""

    seen: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        RecordTrainStart.seen = {
            "step": trainer.global_step,
            "weights": {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad},
            "exp_avg": {
                n: opt.state[p]["exp_avg"].clone() for n, p in pl_module.named_parameters() if p.requires_grad
            },
            "lr_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            "strategy": type(trainer.strategy).__name__,
        }


@pytest.mark.parametrize("form", ["folder", "consolidated"])
def test_sharded_checkpoint_resumes_in_one_process(sharded_runs, tmp_path, monkeypatch, form):
    """One process, no sharding strategy: the folder (consolidated in memory), or the single file
    Lightning's ``consolidate_checkpoint`` makes of it, restores the weights, optimizer and schedule
    of step 2, and training goes on to step 4."""
    ckpt = sharded_runs / "ref" / "ck" / "epoch=0-step=2.ckpt"
    saved = read_checkpoint(ckpt)
    if form == "consolidated":
        out = tmp_path / "step2.consolidated"
        monkeypatch.setattr(sys, "argv", ["consolidate_checkpoint", str(ckpt), "--output_file", str(out)])
        runpy.run_module("lightning.fabric.utilities.consolidate_checkpoint", run_name="__main__")
        assert "optimizer_0" in torch.load(out, weights_only=True)  # name-keyed: Lightning cannot resume it
        ckpt = out
    record = '--trainer.callbacks+={"class_path": "tests.test_sharded_checkpoint.RecordTrainStart"}'
    cli = FourDGenCLI(args=fit_args(tmp_path / "one", 4, 1, record, f"--ckpt_path={ckpt}"))
    seen = RecordTrainStart.seen
    assert seen["strategy"] == "SingleDeviceStrategy" and seen["step"] == 2 and seen["lr_epoch"] == 2
    assert set(seen["weights"]) == set(saved["state_dict"])
    for name, value in saved["state_dict"].items():
        assert torch.equal(seen["weights"][name], value), name
    # The folder's optimizer state is keyed by name: each parameter got its own Adam moments back.
    by_name = _load_distributed_checkpoint(sharded_runs / "ref" / "ck" / "epoch=0-step=2.ckpt")["optimizer_0"]
    assert set(by_name["state"]) == set(seen["exp_avg"])
    for name, state in by_name["state"].items():
        assert torch.equal(seen["exp_avg"][name], state["exp_avg"]), name
    assert cli.trainer.global_step == 4 and sorted(losses(tmp_path / "one")) == [2, 3]
    trained = {n: p for n, p in cli.model.named_parameters() if p.requires_grad}
    assert not all(torch.equal(trained[k], v) for k, v in saved["state_dict"].items())


def _dit_output(model, seed: int = 0) -> torch.Tensor:
    cfg = model.transformer.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, 2, 4, 8, generator=g)  # 2 latent frames, 4 x (2 x 4) width-fused
    text = torch.randn(1, 8, cfg.text_dim, generator=g)
    with torch.no_grad():
        return model.transformer(x, torch.tensor([500.0]), text, return_dict=False)[0]


def test_lora_export_of_a_sharded_checkpoint_equals_the_trained_adapter(sharded_runs, tmp_path):
    """``fourdgen export <folder>`` on the CPU writes the adapter that, loaded back with the project's
    loader (``init_lora``), gives the DiT of the checkpoint: LoRA at its scale, domain embeddings."""
    from fourdgen.stages.video import VideoDiffusion

    ckpt = sharded_runs / "ref" / "ck" / "last.ckpt"
    main(["export", str(ckpt), "--out", str(tmp_path / "lora")])
    saved = read_checkpoint(ckpt)
    hp = {k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")}
    trained = VideoDiffusion(**hp)
    trained.configure_model()
    assert not trained.load_state_dict(saved["state_dict"], strict=False).unexpected_keys
    loaded = VideoDiffusion(**{**hp, "init_lora": str(tmp_path / "lora")})
    loaded.configure_model()
    emb = "transformer.patch_embedding.domain_embedding"
    assert torch.equal(dict(loaded.named_parameters())[emb], saved["state_dict"][emb])
    fresh = VideoDiffusion(**hp)
    fresh.configure_model()
    want = _dit_output(trained)
    assert not torch.allclose(want, _dit_output(fresh), atol=1e-4)  # training moved it: the test can fail
    torch.testing.assert_close(_dit_output(loaded), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("command", ["fit", "export"])
def test_an_incomplete_sharded_folder_is_one_error_naming_it(sharded_runs, tmp_path, capsys, command):
    import shutil

    broken = tmp_path / "last.ckpt"
    shutil.copytree(sharded_runs / "ref" / "ck" / "last.ckpt", broken)
    (broken / "meta.pt").unlink()  # as if the save was cut before Lightning's metadata
    args = fit_args(tmp_path / "run", 4, 1, f"--ckpt_path={broken}")
    with pytest.raises(SystemExit) as e:
        main(args if command == "fit" else ["export", str(broken), "--out", str(tmp_path / "lora")])
    assert e.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fourdgen: error: ")]
    assert len(err) == 1 and str(broken) in err[0] and "without meta.pt" in err[0], err


def test_a_finished_sharded_checkpoint_stops_before_training(sharded_runs, tmp_path, capsys):
    """Its step is read from the folder's meta.pt, as a file's is: nothing to train, exit 0."""
    ckpt = sharded_runs / "ref" / "ck" / "last.ckpt"
    with pytest.raises(SystemExit) as e:
        main(fit_args(tmp_path / "run", 4, 2, f"--ckpt_path={ckpt}"))
    assert e.value.code == 0 and f"{ckpt} already finished at step 4" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_a_folder_swap_cut_between_its_renames_names_the_copy_to_resume_from(tmp_path):
    """A sharded checkpoint replaces the previous folder in two renames (old aside, new in place): a
    kill between them leaves no ``last.ckpt``, and the error names the previous one."""
    from fourdgen.errors import ConfigError
    from fourdgen.io import check_checkpoint_file

    (tmp_path / ".last.ckpt.old").mkdir()
    want = r"no such file or folder \(the previous one is .*\.last\.ckpt\.old"
    with pytest.raises(ConfigError, match=want):
        check_checkpoint_file(tmp_path / "last.ckpt")
