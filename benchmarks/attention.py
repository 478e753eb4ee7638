"""Fused view-time attention on the GPU: the block-sparse path against dense SDPA and the ideal.

For each grid: block-mask build time (uncached, synchronised), then forward and forward+backward
of the fused mask with FlexAttention (the library path and kernel-option variants), of a variant
with every frame padded to a multiple of 128 tokens (blocks never straddle frames), and of dense
SDPA over all tokens (no mask). "ideal" is dense time x the share of blocks the fused path
computes; "token ideal" uses the mask's exact density instead. Times: median of ``--iters`` runs
after warm-up, CUDA events, bf16.

    python benchmarks/attention.py                  # both paper grids
    python benchmarks/attention.py --grid 8x8x30x52 --heads 40
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from fourdgen.nn.fused_attention import compiled_flex, flex_kernel_options, grid_attention
from fourdgen.nn.grid_layout import GridLayout
from fourdgen.nn.view_time_mask import ViewTimeMask, block_structure, computed_fraction

GRIDS = {
    # Wan-14B, 480p, 29 frames: 8 views x 8 latent frames x 30x52 tokens, 40 heads
    "8x8x30x52": dict(layout=GridLayout(8, 8, 30, 52), heads=40, terms=("same_view", "same_time")),
    # Full-4D shape: 6 views x (21 target + 21 condition) frames x 24x42 tokens, Wan2.2-5B's 24 heads
    "6x42x24x42": dict(
        layout=GridLayout(6, 42, 24, 42, target_frames=21),
        heads=24,
        terms=("same_view", "same_time", "cross_half"),
    ),
}
KERNEL_VARIANTS = {
    "TMA": {"USE_TMA": True},
    "M128N128w8s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "M128N64w8s2": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    "M128N128w8s3 TMA": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
}


def timed(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def fwd_bwd(attn, q, k, v):
    def run():
        out = attn(q, k, v)
        out.backward(torch.ones_like(out))

    return run


def padded_block_mask(
    layout: GridLayout, mask: ViewTimeMask, device, block: int = 128
) -> tuple[BlockMask, int]:
    """Block mask of ``layout`` with every frame padded to ``P`` (a multiple of ``block``) tokens:
    key blocks of allowed frame pairs are full, except each frame's last (padding) block."""
    n = layout.frame_tokens
    P = -(-n // block) * block
    padded = GridLayout(layout.views, layout.frames, 1, P, layout.t_max, layout.target_frames)
    allowed, _ = block_structure(
        mask.frames(layout, device), padded, block
    )  # blocks lie inside frames: full == allowed
    nb = P // block
    last = (torch.arange(allowed.shape[1], device=device) % nb) == nb - 1
    partial = allowed & last[None] if n != P else torch.zeros_like(allowed)
    full = allowed & ~partial

    mask_mod = mask.mask_mod(layout, pad_to=P)

    def kv(sel):
        idx = torch.argsort(sel.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return sel.sum(-1, dtype=torch.int32)[None, None], idx[None, None]

    N = padded.num_tokens
    bm = BlockMask.from_kv_blocks(
        *kv(partial), *kv(full), BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(N, N)
    )
    return bm, P


def pad_frames(x: torch.Tensor, layout: GridLayout, P: int) -> torch.Tensor:
    B, H, N, D = x.shape
    x = x.view(B, H, layout.num_frames, layout.frame_tokens, D)
    return F.pad(x, (0, 0, 0, P - layout.frame_tokens)).view(B, H, layout.num_frames * P, D)


def unpad_frames(x: torch.Tensor, layout: GridLayout, P: int) -> torch.Tensor:
    B, H, _, D = x.shape
    return x.view(B, H, layout.num_frames, P, D)[:, :, :, : layout.frame_tokens].reshape(B, H, -1, D)


def all_full_block_mask(N: int, device, block: int = 128) -> BlockMask:
    """Every block computed without a mask: flex's dense throughput (its kernel's ceiling)."""
    nb = -(-N // block)
    ones = torch.ones(nb, nb, dtype=torch.bool, device=device)
    idx = torch.arange(nb, device=device, dtype=torch.int32).expand(nb, nb).contiguous()
    cnt = ones.sum(-1, dtype=torch.int32)
    none = torch.zeros(1, 1, nb, dtype=torch.int32, device=device)
    return BlockMask.from_kv_blocks(
        none, idx[None, None], cnt[None, None], idx[None, None], BLOCK_SIZE=block, seq_lengths=(N, N)
    )


def _cudnn(q, k, v):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)
    return out[0], out[1]  # output [B, H, L, D], logsumexp [B, H, L] (float32)


@torch.compile(dynamic=False)
def _merge(ov, lv, ot, lt, of, lf):
    m = torch.maximum(lv, lt)
    wv, wt, wf = (torch.exp(x - m)[..., None] for x in (lv, lt, lf))
    return ((wv * ov.float() + wt * ot.float() - wf * of.float()) / (wv + wt - wf)).to(ov.dtype)


def lse_view_time(q, k, v, layout: GridLayout):
    """View-OR-time attention as three dense cuDNN attentions (per view, per time, minus per frame)
    merged exactly through their log-sum-exp. Forward only (no autograd here); B = 1."""
    _, H, N, D = q.shape
    V, Fr, n = layout.views, layout.frames, layout.frame_tokens

    def per_view(x):
        return x.view(H, V, Fr * n, D).transpose(0, 1)

    def per_time(x):
        return x.view(H, V, Fr, n, D).permute(2, 0, 1, 3, 4).reshape(Fr, H, V * n, D)

    def per_frame(x):
        return x.view(H, V * Fr, n, D).transpose(0, 1)

    ov, lv = _cudnn(per_view(q[0]), per_view(k[0]), per_view(v[0]))
    ot, lt = _cudnn(per_time(q[0]), per_time(k[0]), per_time(v[0]))
    of, lf = _cudnn(per_frame(q[0]), per_frame(k[0]), per_frame(v[0]))
    ov, lv = ov.transpose(0, 1).reshape(H, N, D), lv.transpose(0, 1).reshape(H, N)
    ot = ot.view(Fr, H, V, n, D).permute(1, 2, 0, 3, 4).reshape(H, N, D)
    lt = lt.view(Fr, H, V, n).permute(1, 2, 0, 3).reshape(H, N)
    of, lf = of.transpose(0, 1).reshape(H, N, D), lf.transpose(0, 1).reshape(H, N)
    return _merge(ov, lv, ot, lt, of, lf)[None]


def padded_variant(layout: GridLayout, mask: ViewTimeMask, dev, record) -> None:
    """Flex on frames padded to a multiple of 128 tokens (pad, attend, unpad)."""
    t0 = time.perf_counter()
    pbm, P = padded_block_mask(layout, mask, dev)
    torch.cuda.synchronize()
    pfrac = computed_fraction(pbm)
    print(
        f"padded frames to {P} tokens: mask build {(time.perf_counter() - t0) * 1000:.1f} ms, "
        f"computed blocks {pfrac:.4f} of a {(P / layout.frame_tokens) ** 2:.3f}x larger square"
    )
    fx = torch.compile(flex_attention, dynamic=False)
    record(
        "flex, frames padded",
        lambda q, k, v: unpad_frames(
            fx(pad_frames(q, layout, P), pad_frames(k, layout, P), pad_frames(v, layout, P), block_mask=pbm),
            layout,
            P,
        ),
    )


def bench_grid(name: str, spec: dict, args) -> list[dict]:
    layout, terms = spec["layout"], spec["terms"]
    heads = args.heads or spec["heads"]
    dev = torch.device("cuda")
    mask = ViewTimeMask(terms)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    bm = mask.block_mask(layout, dev)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    frac, density = computed_fraction(bm), mask.density(layout)
    N = layout.num_tokens
    print(
        f"\n## {name}: {layout.views} views x {layout.frames} frames x {layout.frame_tokens} tokens = {N}, "
        f"{heads} heads x 128; terms {list(terms)}"
    )
    print(
        f"mask build {build_s * 1000:.1f} ms (uncached); computed blocks {frac:.4f}; "
        f"token density {density:.4f}"
    )
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, N, 128, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
        for _ in range(3)
    )
    rows = []

    def record(label, fn, backward=True):
        try:
            with torch.no_grad():
                f = timed(lambda: fn(q, k, v), args.iters)
            fb = timed(fwd_bwd(fn, q, k, v), args.iters) if backward else float("nan")
        except Exception as e:  # a kernel option a torch version does not take
            print(f"{label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            return
        rows.append({"grid": name, "path": label, "fwd": f, "fwd_bwd": fb})
        print(f"{label}: fwd {f:.1f} ms, fwd+bwd {fb:.1f} ms")

    record("dense SDPA (no mask)", lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    dense = rows[-1]
    record("fused (library, flex)", lambda q, k, v: grid_attention(q, k, v, layout, mask, "flex"))
    fused = rows[-1]
    lib = flex_kernel_options(q)
    print(f"library flex kernel options: {lib}")
    full = all_full_block_mask(N, dev)
    record(
        "flex, every block (kernel ceiling)",
        lambda q, k, v: compiled_flex()(q, k, v, block_mask=full, kernel_options=lib),
    )
    if set(terms) == {"same_view", "same_time"}:
        with torch.no_grad():
            ref = grid_attention(q, k, v, layout, mask, "flex")
            err = (lse_view_time(q, k, v, layout) - ref).abs().max().item()
        print(f"LSE merge vs flex: max abs diff {err:.2e}")
        record(
            "3 cuDNN attentions + LSE merge (fwd only)", lambda q, k, v: lse_view_time(q, k, v, layout), False
        )
    for label, opts in KERNEL_VARIANTS.items() if args.variants else ():
        fx = torch.compile(flex_attention, dynamic=False)
        record(f"flex {label}", lambda q, k, v, fx=fx, o=opts: fx(q, k, v, block_mask=bm, kernel_options=o))
    if args.variants:
        padded_variant(layout, mask, dev, record)
    ideal_f, ideal_fb = dense["fwd"] * frac, dense["fwd_bwd"] * frac
    print(
        f"ideal (dense x computed blocks): fwd {ideal_f:.1f} ms, fwd+bwd {ideal_fb:.1f} ms; "
        f"token ideal fwd {dense['fwd'] * density:.1f} ms"
    )
    best = min((r for r in rows if r is not dense), key=lambda r: r["fwd"])
    print(
        f"library fused / ideal: fwd {fused['fwd'] / ideal_f:.2f}x, "
        f"fwd+bwd {fused['fwd_bwd'] / ideal_fb:.2f}x; "
        f"best variant {best['path']!r}: fwd {best['fwd'] / ideal_f:.2f}x; dense / fused fwd "
        f"{dense['fwd'] / fused['fwd']:.2f}x"
    )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    p.add_argument("--heads", type=int, default=None, help="override the grid's head count")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--variants", action="store_true", help="also flex kernel options and padded frames")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    compiled_flex()  # raises dynamo's recompile limit: the variants below all compile flex_attention
    for name in args.grid:
        bench_grid(name, GRIDS[name], args)


if __name__ == "__main__":
    main()
