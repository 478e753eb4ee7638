"""Helpers shared by the stage modules."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fourdgen.batch import GridBatch
from fourdgen.errors import ConfigError


def check_finite(value: Tensor | float, name: str, step: int) -> None:
    """Stop training on a NaN/inf loss *before* backward, so no weight is corrupted and the last
    checkpoint stays the one to resume from."""
    if isinstance(value, Tensor) and not torch.isfinite(value.detach()).all():
        bad = value.detach().float().flatten()[0].item()
        raise FloatingPointError(
            f"{name} is {bad} at global step {step}: stopping before the "
            "optimizer step so the weights stay finite. Resume from the last checkpoint (--ckpt_path last) "
            "with a lower learning rate, or check the input data."
        )


def any_nonfinite(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-d float tensor, 1.0 if any element of ``tensors`` is NaN/inf, else 0.0, in a few
    multi-tensor kernels and no host sync: amp's finite check (what ``GradScaler`` runs), grouped
    by device and dtype as it needs, with a scale of 1 (the values are unchanged). A per-tensor
    ``isfinite().all()`` is about six launches each, hundreds per step for the 4DGS fitter's
    parameters, which is launch-bound (issue 21)."""
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    flags = []
    for (device, _), group in groups.items():
        found = torch.zeros((), device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones((), device=device))
        flags.append(found)
    if not flags:
        return torch.zeros(())
    return flags[0] if len(flags) == 1 else torch.stack([f.to(flags[0].device) for f in flags]).amax()


def check_finite_grads(module: torch.nn.Module, step: int, terms: Sequence[tuple[str, Tensor]] = ()) -> None:
    """Stop on a non-finite gradient before the optimizer applies it (a finite loss can still
    back-propagate NaN, e.g. from a degenerate camera or splat in a renderer), naming the parameters.
    ``terms``: ``(name, value)`` loss terms of the batches behind these gradients, checked in the
    same host sync (a non-finite term is named first, as :func:`check_finite` does)."""
    grads, local, stacked = _check_inputs(module, terms)
    if not grads and not terms:
        return
    if bool(any_nonfinite(stacked + local)):  # the step's one host sync
        _raise_nonfinite(grads, local, terms, step)


def _check_inputs(module: torch.nn.Module, terms: Sequence[tuple[str, Tensor]]):
    """``(named gradients, their local tensors, [the terms stacked])`` for a finite check."""
    grads = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for _, g in grads]  # DTensor shards
    # the terms are 0-d: stacked (a copy, so the check's in-place scale by 1 touches no loss)
    stacked = [torch.stack([v.detach().float().reshape(()) for _, v in terms])] if terms else []
    return grads, local, stacked


def _raise_nonfinite(grads, local, terms, step: int) -> None:
    """The error of a failed check: the culprit term's name first, else the parameters'."""
    for name, value in terms:  # the culprit's own name first, the total last
        check_finite(value, name, step)
    finite = [bool(torch.isfinite(g).all()) for g in local]
    bad = [n for (n, _), good in zip(grads, finite, strict=True) if not good]
    raise FloatingPointError(
        f"non-finite gradients at global step {step} in {len(bad)} parameters ({bad[:4]}...): stopping "
        "before the optimizer step so the weights stay finite. Resume from the last checkpoint "
        "(--ckpt_path last) with a lower learning rate, or check the input data."
    )


def _fused(optimizer) -> bool:
    """Whether every group of ``optimizer`` is a fused Adam/AdamW step, which reads ``found_inf``."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        g.get("fused") for g in optimizer.param_groups
    )


NONFINITE = ("stop", "skip")


class NonFiniteGuard:
    """Mixin of the stage modules: what a non-finite loss term or gradient does, by the
    ``on_nonfinite`` hyper-parameter. ``stop`` (default): raise before the optimizer step, naming
    the step and the term, so the weights and the last checkpoint stay finite. ``skip``: warn, count
    (``train/skipped_batches``) and leave the weights as they were (the loss: ``training_step``
    returns None, so Lightning neither back-propagates nor steps; a gradient: it is dropped).
    ``skip`` is single-process only: a rank that skips would stall the others' all-reduce.
    With a fused Adam, ``stop`` needs no host sync per step: the step skips itself on device and
    the error comes at the next step's start (:meth:`_check_on_device`)."""

    skipped_batches: int = 0

    def _nonfinite_policy(self) -> str:
        policy = self.hparams.get("on_nonfinite", "stop")
        if policy not in NONFINITE:
            raise ValueError(f"on_nonfinite: expected one of {NONFINITE}, got {policy!r}")
        return policy

    def on_fit_start(self) -> None:
        if self._nonfinite_policy() == "skip" and self.trainer.world_size > 1:
            raise ValueError(
                f"on_nonfinite: skip runs in one process only (world size {self.trainer.world_size}): a "
                "rank that skips a batch would stall the others' gradient all-reduce; use stop"
            )

    def _skip(self, what: str) -> None:
        from lightning.pytorch.utilities import rank_zero_warn

        self.skipped_batches += 1
        rank_zero_warn(
            f"{what} at global step {self.global_step}: batch skipped (on_nonfinite: skip; "
            f"{self.skipped_batches} so far)"
        )

    def losses_finite(self, terms: dict[str, Tensor]) -> bool:
        """Whether every term is finite (the culprit's own name first, the total last).

        ``stop``: the terms are checked with the gradients before the optimizer step
        (:meth:`on_before_optimizer_step`), in that check's one host sync, and this returns True.
        A backward pass from a NaN loss changes no weight; the optimizer step would, and it does
        not happen. (A sync per term stalled the launch-bound 4DGS step, issue 21.)
        ``skip``: checked here, in one sync, so the batch can be dropped before its backward."""
        tensors = [(n, v) for n, v in terms.items() if isinstance(v, Tensor)]
        if not tensors:
            return True
        if self._nonfinite_policy() == "stop":
            self.__dict__.setdefault("_unchecked_terms", []).extend((n, v.detach()) for n, v in tensors)
            return True
        ok = torch.stack([torch.isfinite(v.detach()).all() for _, v in tensors]).tolist()
        for (name, _), good in zip(tensors, ok, strict=True):
            if not good:
                self._skip(f"{name} is non-finite")
                self.log("train/skipped_batches", float(self.skipped_batches))
                return False
        return True

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._nonfinite_policy() == "stop":
            terms = self.__dict__.pop("_unchecked_terms", [])
            if _fused(optimizer):
                self._check_on_device(optimizer, terms)
            else:
                check_finite_grads(self, self.global_step, terms)
            return
        self.__dict__.pop("_unchecked_terms", None)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if params and not _all_finite([p.grad for p in params]):
            for p in params:
                p.grad = None  # the optimizer skips parameters without a gradient
            self._skip("non-finite gradients")

    def _check_on_device(self, optimizer, terms: list[tuple[str, Tensor]]) -> None:
        """``stop`` for a fused Adam, without a host sync: the finite check's flag becomes the
        optimizer's ``found_inf`` (what ``GradScaler`` sets), so the fused step itself leaves the
        weights, moments and step count as they were when it is 1, and the host reads it on the
        next step's start (:meth:`resolve_nonfinite_check`, from a pinned copy). The gradients are
        still this step's then (Lightning zeroes them after the next ``training_step``), so the
        error names the same term or parameters, one step later."""
        grads, local, stacked = _check_inputs(self, terms)
        found = any_nonfinite(stacked + local)
        optimizer.found_inf = found
        host = torch.zeros((), pin_memory=found.is_cuda)  # a fresh one: a pending check may hold the last
        host.copy_(found, non_blocking=True)
        event = torch.cuda.Event() if found.is_cuda else None
        if event is not None:
            event.record()
        self.__dict__.setdefault("_pending_checks", []).append((self.global_step, terms, event, host))

    def resolve_nonfinite_check(self) -> None:
        """Raise if the last step's on-device check found a non-finite term or gradient (its update
        did not happen). Called at each training step's start, before a checkpoint and at the end."""
        for step, terms, event, host in self.__dict__.pop("_pending_checks", []):  # one per optimizer
            if event is not None:
                event.synchronize()  # the check's copy only, long done unless the GPU lags a whole step
            if float(host) != 0.0:
                grads, local, _ = _check_inputs(self, [])
                _raise_nonfinite(grads, local, terms, step)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.resolve_nonfinite_check()
        super().on_train_batch_start(batch, batch_idx)

    def on_train_end(self) -> None:
        self.resolve_nonfinite_check()
        super().on_train_end()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.resolve_nonfinite_check()  # no checkpoint of a step that went wrong
        super().on_save_checkpoint(checkpoint)


def logs_this_step(module) -> bool:
    """Whether the logger will write the values ``module`` logs in this training step: Lightning
    writes every ``log_every_n_steps`` steps (its own rule, ``_LoggerConnector.should_update_logs``)
    and the last step's at the end. ``self.log`` costs host time at every call, written or not (its
    result collection's bookkeeping and tensor ops): the fitter's 9 calls were 2.5-3.5 ms of a
    13-17 ms host-bound step on the CPU (benchmarks/RESULTS.md, issue 21, P3 third pass). A step the
    logger skips need not log."""
    trainer = module._trainer
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or trainer.fast_dev_run:
        return True  # no trainer (or a Lightning without the rule): log as Lightning would anyway
    last = 0 < trainer.max_steps <= module.global_step + 1
    return connector.should_update_logs or last


class LateScalars:
    """Scalars for the progress bar without a host sync per step. Lightning turns every value logged
    with ``prog_bar=True`` into a Python number at each step's end (a sync, even with the bar off);
    a CPU tensor costs none. Each call copies the value to pinned host memory asynchronously and
    returns the latest value whose copy is done: one step late, or older while the GPU lags."""

    def __init__(self):
        self._pending: dict[str, tuple[Tensor, torch.cuda.Event]] = {}
        self._shown: dict[str, Tensor] = {}

    def __call__(self, name: str, value: Tensor) -> Tensor:
        value = value.detach()
        if not value.is_cuda:
            return value.float()
        last = self._pending.get(name)
        if last is not None and last[1].query():
            self._shown[name] = last[0]
        host = torch.empty((), pin_memory=True)
        host.copy_(value.float(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending[name] = (host, event)
        if name not in self._shown:  # the first call: nothing earlier to show, one sync
            event.synchronize()
            self._shown[name] = host
        return self._shown[name].clone()


class BatchContract:
    """Mixin of the stage modules: the first batch of each loop (train, validation, test, predict) is
    checked against the :class:`~fourdgen.batch.GridBatch` contract and the optional fields this stage
    reads (:meth:`batch_needs`). A DataModule that does not provide one fails on that batch, in one
    :class:`ConfigError` naming the field and the DataModule class, not as a ``KeyError`` or a
    ``None`` dereference deep inside the model."""

    def batch_needs(self, loop: str) -> list[tuple[tuple[str, ...], str]]:
        """``[(fields, why)]``: optional GridBatch fields the ``loop`` reads; any one of ``fields``
        satisfies an entry, ``why`` says what it is for and how to get it."""
        return []

    def check_batch(self, batch, loop: str) -> None:
        checked = self.__dict__.setdefault("_checked_loops", set())
        if loop in checked:
            return
        dm = self._trainer.datamodule if getattr(self, "_trainer", None) is not None else None
        source = "the dataloader" if dm is None else f"data {type(dm).__module__}.{type(dm).__qualname__}"
        try:
            b = GridBatch.coerce(batch)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"{source}: its {loop} batches break the GridBatch contract (fourdgen/batch.py): {e}"
            ) from None
        for fields, why in self.batch_needs(loop):
            if all(getattr(b, f) is None or getattr(b, f) == [] for f in fields):
                have = sorted(k for k, v in vars(b).items() if v is not None and v != [])
                raise ConfigError(
                    f"{source}: its {loop} batches have no {' or '.join(f'GridBatch.{f}' for f in fields)}, "
                    f"which {type(self).__name__} needs ({why}); the batch has {', '.join(have)}"
                )
        checked.add(loop)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.check_batch(batch, "train")

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.check_batch(batch, "validation")

    def on_test_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.check_batch(batch, "test")

    def on_predict_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.check_batch(batch, "predict")


def _all_finite(tensors: list[Tensor]) -> bool:
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # DTensor shards
    return not bool(any_nonfinite(local))


def adamw_with_warmup(
    params, lr: float, weight_decay: float, warmup_steps: int, betas: tuple[float, float] = (0.9, 0.999)
) -> dict:
    """AdamW with a linear learning-rate warm-up over ``warmup_steps`` (stepped every step), in the
    form ``configure_optimizers`` returns. The factor is ``(step + 1) / warmup`` (diffusers'
    ``constant_with_warmup``, 4DNeX's schedule, has ``step / warmup``: a first step at lr 0)."""
    params = list(params)
    if not params:
        raise ValueError("nothing to train: every parameter is frozen (check the adapter / train_modules)")
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    warm = max(warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def clip_grad_norm(params, max_norm: float) -> Tensor:
    """Scale the gradients of ``params`` so their global L2 norm is at most ``max_norm``; returns the
    norm before clipping (a plain tensor). Works on FSDP2 shards: torch's ``clip_grad_norm_`` reduces
    DTensor norms over the mesh, so every rank scales by the same, global factor."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def fsdp_mesh(mesh, who: str):
    """The data-parallel mesh that FSDP2 shards over, from Lightning's ``ModelParallelStrategy`` mesh
    (None without one). fourdgen shards with FSDP2 only: a tensor-parallel size above 1 is refused."""
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"{who} shards with FSDP2 only: set the ModelParallelStrategy's tensor_parallel_size to 1 "
            f"(got {mesh['tensor_parallel'].size()})"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def step_generator(step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from (the run's seed, ``step``, ``stream``): draws made with it do not
    touch the global RNG (the data order stays put) and repeat when a fit resumes at ``step``."""
    seed = (torch.initial_seed() * 1_000_003 + step) * 31 + stream
    return torch.Generator().manual_seed(seed % 2**63)


def sample_generators(step: int, count: int, stream: int = 0, purpose: str = "") -> list[torch.Generator]:
    """One CPU generator per sample of a batch, seeded from (the run's seed, ``step``, ``stream`` (the
    rank), the sample's index, ``purpose``): a sample's draws do not depend on the global RNG (which
    the data order, the DataLoader workers and other layers share), so each DDP rank and a resumed
    fit draw exactly what the uninterrupted run did. Hashed, so no two keys share a seed."""
    gens = []
    for i in range(count):
        key = repr((torch.initial_seed(), int(step), int(stream), i, purpose)).encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % 2**63
        gens.append(torch.Generator().manual_seed(seed))
    return gens


def compile_graphed(fn):
    """``torch.compile(fn, mode="reduce-overhead")`` (CUDA graphs) for a function of no inputs
    but module parameters, e.g. a field's regularisers: the shapes never change, so one graph
    replays its tens of kernels in one launch (the 4DGS step is launch-bound, issue 21). The
    outputs are cloned: a replay overwrites the graph's output memory, and the caller (the loss,
    Lightning's logged values) keeps them past the next step."""
    compiled = torch.compile(fn, mode="reduce-overhead")

    def call():
        torch.compiler.cudagraph_mark_step_begin()  # one training step: the last replay's outputs are done
        out = compiled()
        return {k: v.clone() for k, v in out.items()} if isinstance(out, dict) else out.clone()

    return call


def compile_dynamic(fn, backend="inductor"):
    """``torch.compile(fn, dynamic=True)`` for inputs whose length changes (densification).

    Dynamo treats ``nn.Parameter`` inputs as static-shaped (``force_parameter_static_shapes``) and
    recompiles on every new number of Gaussians until its recompile limit, then runs eagerly. A
    view of a parameter is a plain tensor with the same autograd path, so it gets dynamic sizes.
    Python floats (the fitter's time ``t`` at export and along camera paths) become 0-d tensors on
    the first tensor argument's device: Dynamo specialises on each float's value, so 81 export
    times meant 81 recompiles (the recompile limit, then eager) at Full-4D's size.
    """
    compiled = torch.compile(fn, dynamic=True, backend=backend)

    def call(*args):
        device = next((a.device for a in args if isinstance(a, Tensor)), None)
        return compiled(
            *(
                a.view_as(a)
                if isinstance(a, nn.Parameter)
                else torch.tensor(a, dtype=torch.float32, device=device)
                if isinstance(a, float)
                else a
                for a in args
            )
        )

    return call
