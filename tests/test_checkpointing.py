"""Selective activation checkpointing of the Wan DiT (fourdgen.nn.checkpointing): the attention
kernels' outputs are kept, the rest recomputed; gradients equal full checkpointing's."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fourdgen.backbones.wan import build_transformer
from fourdgen.nn.checkpointing import ATTENTION_OPS, checkpoint_function, compile_options


class CountAttention(TorchDispatchMode):
    """Counts the fused attention kernels that run (forward kernels only)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket in ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def _step(policy: str | None, compile: dict | None = None):
    torch.manual_seed(0)
    model = build_transformer(preset="tiny").train()
    if policy is not None:
        fn = checkpoint_function(policy, compile=compile)
        model.enable_gradient_checkpointing(gradient_checkpointing_func=fn)
    elif compile is not None:
        model.compile_repeated_blocks(**compile)
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


# aot_eager: dynamo and AOT autograd's partitioner, as inductor gets them, but no codegen (seconds on
# CPU); inductor's own numerics are the GPU benchmark's (benchmarks/video_step.py --compile).
AOT = {"backend": "aot_eager", "dynamic": False}


@pytest.mark.parametrize("policy", ["full", "keep_attention", None])
def test_compiled_blocks_share_one_graph_keep_the_policy_and_the_gradients(policy):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    plain_calls, plain = _step(None)
    calls, got = _step(policy, compile=AOT)
    blocks = build_transformer(preset="tiny").config.num_layers
    assert blocks > 1 and counters["stats"]["unique_graphs"] == 1  # every block runs the one graph
    # compiled outside the checkpoint, the selective policy still holds: attention is not recomputed
    assert calls == {"full": 2 * blocks, "keep_attention": 0, None: 0}[policy]
    assert got.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(got[name], plain[name], msg=name)


def test_compile_blocks_option():
    from fourdgen.stages.video import VideoDiffusion

    assert compile_options(False) is None and compile_options(True) == {"dynamic": False}
    assert compile_options({"mode": "max-autotune"}) == {"dynamic": False, "mode": "max-autotune"}
    model = VideoDiffusion(gradient_checkpointing=True, compile_blocks={"backend": "aot_eager"})
    model.configure_model()
    func = model.transformer._gradient_checkpointing_func
    assert hasattr(func, "_torchdynamo_orig_callable")  # the checkpointed call is the compiled one
    model = VideoDiffusion(compile_blocks={"backend": "aot_eager"})
    model.configure_model()
    assert all(b._compiled_call_impl is not None for b in model.transformer.blocks)
