"""Activation checkpointing of DiT blocks that keeps the attention outputs (selective checkpointing).

Full checkpointing reruns a block's whole forward in backward. At Wan's clip lengths attention is
over half of a block's FLOPs (35,100 tokens at 14B: 25 of 47 TFLOP per block forward), so
recomputing it is the largest part of the overhead. Saving the outputs of the attention kernels (one
``[B, H, N, D]`` tensor and its log-sum-exp per call) and recomputing only the cheap rest is what
torch's selective activation checkpointing does (``create_selective_checkpoint_contexts``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("full", "keep_attention")
aten = torch.ops.aten
# The fused SDPA kernels (their outputs include the log-sum-exp their backward needs).
ATTENTION_OPS = tuple(
    op
    for op in (
        getattr(aten, "_scaled_dot_product_flash_attention", None),
        getattr(aten, "_scaled_dot_product_cudnn_attention", None),
        getattr(aten, "_scaled_dot_product_efficient_attention", None),
        getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None),
    )
    if op is not None
)
_SAVED = {op.default for op in ATTENTION_OPS}


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_function(
    policy: Literal["full", "keep_attention"] = "full", compile: dict[str, Any] | None = None
) -> Callable:
    """The ``checkpoint`` to hand diffusers' ``enable_gradient_checkpointing(gradient_checkpointing_func=)``:
    ``full`` recomputes everything (diffusers' own default), ``keep_attention`` saves the attention
    kernels' outputs and recomputes the rest.

    ``compile``: ``torch.compile`` options; the checkpointed call is then compiled, block included
    (regional compilation). Compiled outside the checkpoint, not inside it: dynamo traces the
    checkpoint region and the partitioner applies the policy within the one graph; a compiled block
    inside an eager checkpoint would hide its ops from the selective policy. The block comes in as
    an argument, so every block of a DiT shares one graph."""
    if policy not in POLICIES:
        raise ValueError(f"checkpoint policy must be one of {POLICIES}, got {policy!r}")
    if policy == "full":
        fn = functools.partial(checkpoint, use_reentrant=False)
    else:
        context = functools.partial(create_selective_checkpoint_contexts, _keep_attention)
        fn = functools.partial(checkpoint, use_reentrant=False, context_fn=context)
    return fn if compile is None else torch.compile(fn, **compile)


def compile_options(spec: bool | dict[str, Any] | None) -> dict[str, Any] | None:
    """A ``compile_blocks`` option -> ``torch.compile`` keyword arguments (None: not compiled).
    ``True`` means ``dynamic=False`` (a training clip's shapes are fixed)."""
    if not spec:
        return None
    return {"dynamic": False, **(spec if isinstance(spec, dict) else {})}
