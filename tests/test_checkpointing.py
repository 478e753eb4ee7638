"""Selective activation checkpointing of the Wan DiT (fourdgen.nn.checkpointing): the attention
kernels' outputs are kept, the rest recomputed; gradients equal full checkpointing's."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fourdgen.backbones.wan import build_transformer
from fourdgen.nn.checkpointing import ATTENTION_OPS, checkpoint_function


class CountAttention(TorchDispatchMode):
    """Counts the fused attention kernels that run (forward kernels only)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket in ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def _step(policy: str | None):
    torch.manual_seed(0)
    model = build_transformer(preset="tiny").train()
    if policy is not None:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function(policy))
    x = torch.randn(1, 16, 3, 8, 8)
    text = torch.randn(1, 7, model.config.text_dim)
    out = model(x, torch.tensor([500.0]), text, return_dict=False)[0]
    counter = CountAttention()
    with counter:
        out.square().mean().backward()
    return counter.calls, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_keep_attention_recomputes_no_attention_and_gives_the_same_gradients():
    plain_calls, plain = _step(None)
    full_calls, full = _step("full")
    keep_calls, keep = _step("keep_attention")
    blocks = build_transformer(preset="tiny").config.num_layers
    assert plain_calls == 0  # nothing recomputed without checkpointing
    assert full_calls == 2 * blocks  # self- and cross-attention of every block, again in backward
    assert keep_calls == 0
    assert plain.keys() == full.keys() == keep.keys()
    for name in plain:
        torch.testing.assert_close(full[name], plain[name], msg=name)
        torch.testing.assert_close(keep[name], plain[name], msg=name)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="checkpoint policy must be one of"):
        checkpoint_function("some")


def test_the_stage_option_reaches_the_dit():
    from fourdgen.stages.video import VideoDiffusion

    model = VideoDiffusion(gradient_checkpointing=True, checkpoint_policy="keep_attention")
    model.configure_model()
    func = model.transformer._gradient_checkpointing_func
    assert model.transformer.gradient_checkpointing and "context_fn" in func.keywords
