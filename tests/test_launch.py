"""The multi-process launch recipes of the README ("Several GPUs and nodes") on one machine, two CPU
processes (gloo): ``torchrun`` and ``scripts/slurm/fit_multinode.sbatch`` with its ``srun`` replaced
by a shim that starts the same command twice with the variables srun gives each task. Each run
trains the tiny 4DNeX stage (LoRA) under FSDP2 for 2 steps and writes one sharded checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
from lightning.fabric.plugins.environments.lightning import find_free_network_port

from fourdgen.cli import checkpoint_step

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "lightning_configs" / "tiny" / "video.yaml")
SBATCH = ROOT / "scripts" / "slurm" / "fit_multinode.sbatch"


class RankSteps(L.Callback):
    """Every rank says which steps it trained (Lightning's loggers write rank 0's only)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        print(f"rank {trainer.global_rank} trained step {trainer.global_step}", file=sys.stderr, flush=True)


def fit_overrides(out: Path) -> list[str]:
    """What the tests add to the launch recipes: the CPU, a tiny LoRA run of 2 steps, its folders."""
    return [
        "--model.init_args.lora_rank=4",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=2",
        "--trainer.check_val_every_n_epoch=1000",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={out}",
        "--trainer.callbacks=fourdgen.callbacks.checkpoint.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={out}/ck",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=0",
        f"--trainer.callbacks+={RankSteps.__module__}.RankSteps",
        f"--data.init_args.root={out}/scenes",
        f"--data.init_args.cache_dir={out}/cache",
        "--num_threads=1",
    ]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "FOURDGEN_DEBUG"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _run(cmd: list[str], out: Path, env: dict[str, str], what: str) -> str:
    """Run ``cmd`` from the checkout, stderr to a file (not a pipe that could fill); its text."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "stderr.txt"
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what} did not finish within 300 s; its output: {log}\n{log.read_text()[-3000:]}")
    text = log.read_text()
    rc = proc.returncode
    assert rc == 0, f"{what} exited with {rc}; its output ({log}) ends:\n{text[-3000:]}"
    return text


def _check_two_ranks_one_checkpoint(out: Path, text: str, what: str) -> None:
    # Lightning took the launcher's processes as its two ranks (a rank that re-launched itself would
    # make a second pair).
    members = [line.split("MEMBER: ")[1] for line in text.splitlines() if "MEMBER: " in line]
    assert sorted(members) == ["1/2", "2/2"], f"{what}: Lightning's ranks {members}"
    for rank in (0, 1):
        for step in (1, 2):
            assert f"rank {rank} trained step {step}" in text, f"{what}: rank {rank} missed step {step}"
    ck = out / "ck"
    assert [p.name for p in ck.iterdir()] == ["last.ckpt"], f"{what}: {sorted(os.listdir(ck))}"
    shards = {p.name for p in (ck / "last.ckpt").iterdir()}
    assert shards == {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"}, f"{what}: {shards}"
    assert checkpoint_step(ck / "last.ckpt") == 2


def test_torchrun_two_processes_train_and_write_one_sharded_checkpoint(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [
        *launcher,
        "--standalone",  # one node; its rendezvous takes a free port
        "--nproc_per_node=2",
        "-m",
        "fourdgen.main",
        "fit",
        f"--config={RECIPE}",
        "--trainer.devices=2",
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.data_parallel_size=2",
        "--trainer.strategy.tensor_parallel_size=1",
        *fit_overrides(tmp_path),
    ]
    text = _run(cmd, tmp_path, _env(), "torchrun")
    _check_two_ranks_one_checkpoint(tmp_path, text, "torchrun")


# srun as it starts one task per process: the same command, SLURM's variables for each task.
FAKE_SRUN = textwrap.dedent(
    """\
    #!/usr/bin/env bash
    while [[ "${1:-}" == -* ]]; do shift; done  # srun's own options
    pids=()
    for ((i = 0; i < SLURM_NTASKS; i++)); do
      SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" & pids+=($!)
    done
    rc=0
    for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
    exit $rc
    """
)


def test_sbatch_script_parses():
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True).returncode == 0
    text = SBATCH.read_text()
    assert "srun" in text and "#SBATCH --ntasks-per-node" in text and "NCCL_" not in text


def test_sbatch_script_trains_on_two_local_tasks_through_a_srun_shim(tmp_path):
    """The script's srun line, run by a shim with 2 tasks on this machine (1 node x 2 "GPUs")."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "srun").write_text(FAKE_SRUN)
    (shim / "srun").chmod(0o755)
    env = _env(
        PATH=f"{shim}{os.pathsep}{os.environ.get('PATH', '')}",
        CONFIG=RECIPE,
        PYTHON=sys.executable,  # the script's interpreter (default: `python` on the PATH)
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="fourdgen-fit",  # not "bash"/"interactive", which Lightning takes as no srun
        SLURM_NNODES="1",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NODELIST="localhost",
        MASTER_PORT=str(find_free_network_port()),  # else the job id's port: two test runs could meet
    )
    assert shutil.which("srun", path=env["PATH"]) == str(shim / "srun")
    run = tmp_path / "run"
    text = _run(["bash", str(SBATCH), *fit_overrides(run)], run, env, "sbatch script")
    assert "SLURM auto-requeueing enabled" in text  # Lightning's SLURMEnvironment, not its own launcher
    _check_two_ranks_one_checkpoint(run, text, "sbatch script")
