"""Model FLOPs and MFU (model FLOPs utilisation) of a training step.

The count comes from torch's :class:`~torch.utils.flop_counter.FlopCounterMode` over one forward,
split into matrix products (linear layers, convolutions) and attention. A step of LoRA training on a
frozen base costs, per the convention the benchmarks report (issue 21):

- linear layers: forward + the input-gradient backward = 2x forward (no weight gradients for the base);
- attention: forward + backward = 3x forward;
- gradient-checkpoint recompute is not counted (it is overhead, not model work).

MFU = model FLOPs / step time / the bf16 matmul rate measured on the same device in the same run.
Attention is recognised by its fused kernels (flash, cuDNN, efficient, flex, CPU flash); SDPA's math
fallback (meta tensors, some masks) runs as ``bmm`` and counts as matrix products.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "matmul")


def _cpu_flash_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
    """The CPU SDPA kernel, which torch's registry leaves uncounted (the CUDA kernels are counted)."""
    return sdpa_flop_count(query.shape, key.shape, value.shape)


_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_registry:  # a later torch may count it itself; registering twice raises
    register_flop_formula(_CPU_SDPA, get_raw=True)(_cpu_flash_flop)


@dataclass(frozen=True)
class FlopSplit:
    """Forward FLOPs of one call, by kind (multiply-adds count 2)."""

    matmul: int
    attention: int
    other: int = 0

    @property
    def total(self) -> int:
        return self.matmul + self.attention + self.other

    def lora_step(self) -> int:
        """FLOPs of a training step on a frozen base: 2x the matmuls, 3x attention (module docstring)."""
        return 2 * self.matmul + 3 * self.attention


def count_flops(fn: Callable[[], object]) -> FlopSplit:
    """Forward FLOPs of ``fn()`` (run once, under ``no_grad`` so no backward is recorded)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    matmul = attention = other = 0
    for op, n in counter.get_flop_counts()["Global"].items():
        name = str(op).split(".")[-1]
        if "attention" in name:
            attention += n
        elif name in MATMUL_OPS:
            matmul += n
        else:
            other += n
    return FlopSplit(int(matmul), int(attention), int(other))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(
    device: torch.device | str = "cuda", n: int = 8192, dtype: torch.dtype = torch.bfloat16, iters: int = 10
) -> float:
    """Measured FLOP/s of an ``n^3`` matrix product on random data (mean of ``iters`` after 3 warm-ups):
    the reference an MFU is divided by, taken in the same run as the step it judges."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def mfu(step_flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation of a step that did ``step_flops`` model FLOPs in ``seconds``."""
    return step_flops / seconds / peak_flops_per_s
