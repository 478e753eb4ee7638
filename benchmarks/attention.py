"""Fused view-time attention on the GPU: the block-sparse path against dense SDPA and the ideal.

For each grid: block-mask build time (uncached, synchronised), then forward and forward+backward
of the fused mask with FlexAttention (the library path and kernel-option variants), of the LSE path
for view-OR-time masks (two disjoint dense attentions merged by log-sum-exp, cuDNN and flash kernels:
fourdgen/nn/lse_attention.py), of a variant with every frame padded to a multiple of 128 tokens
(blocks never straddle frames), and of dense SDPA over all tokens (no mask). "ideal" is dense time
x the share of blocks the fused path computes; "token ideal" uses the mask's exact density instead.
Times: median of ``--iters`` runs after warm-up, CUDA events, bf16; peak = max memory allocated
during forward+backward, above the inputs.

    python benchmarks/attention.py                  # both paper grids
    python benchmarks/attention.py --grid 8x8x30x52 --heads 40
    python benchmarks/attention.py --grid 8x8x30x52 --heads-inner   # q/k/v as the DiT gives them
    python benchmarks/attention.py --tiny           # a small grid, runs on CPU too (checks the script)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from fourdgen.nn.attention_kernels import fused_kernel
from fourdgen.nn.fused_attention import compiled_flex, flex_kernel_options, grid_attention
from fourdgen.nn.grid_layout import GridLayout
from fourdgen.nn.lse_attention import view_time_attention
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
# --tiny: 3 views x 4 frames x 4x6 tokens (24-token frames: blocks straddle frames), 2 heads.
TINY = dict(layout=GridLayout(3, 4, 4, 6), heads=2, terms=("same_view", "same_time"))
KERNEL_VARIANTS = {
    "TMA": {"USE_TMA": True},
    "M128N128w8s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "M128N64w8s2": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    "M128N128w8s3 TMA": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
}


def timed(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn``: CUDA events on the GPU, wall clock on the CPU."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def peak_gib(fn) -> float:
    """Peak memory allocated while ``fn`` runs, above what was allocated before (GiB; nan on CPU)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


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


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_grid(name: str, spec: dict, args) -> list[dict]:
    layout, terms = spec["layout"], spec["terms"]
    heads = args.heads or spec["heads"]
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    mask = ViewTimeMask(terms)
    sync()
    t0 = time.perf_counter()
    bm = mask.block_mask(layout, dev)
    sync()
    build_s = time.perf_counter() - t0
    frac, density = computed_fraction(bm), mask.density(layout)
    N, D = layout.num_tokens, args.head_dim
    print(
        f"\n## {name}: {layout.views} views x {layout.frames} frames x {layout.frame_tokens} tokens = {N}, "
        f"{heads} heads x {D}; terms {list(terms)}; {dtype}; "
        f"q/k/v {'[B, N, H, D] transposed (DiT)' if args.heads_inner else '[B, H, N, D] contiguous'}"
    )
    print(
        f"mask build {build_s * 1000:.1f} ms (uncached); computed blocks {frac:.4f}; "
        f"token density {density:.4f}"
    )
    g = torch.Generator(device=dev).manual_seed(0)

    def tensor():
        shape = (1, N, heads, D) if args.heads_inner else (1, heads, N, D)
        x = torch.randn(*shape, device=dev, dtype=dtype, generator=g)
        return (x.transpose(1, 2) if args.heads_inner else x).requires_grad_()

    q, k, v = tensor(), tensor(), tensor()
    rows = []

    def record(label, fn, backward=True):
        try:
            with torch.no_grad():
                f = timed(lambda: fn(q, k, v), args.iters)
            fb = timed(fwd_bwd(fn, q, k, v), args.iters) if backward else float("nan")
            mem = peak_gib(fwd_bwd(fn, q, k, v)) if backward else float("nan")
        except Exception as e:  # a kernel option a torch version does not take
            print(f"{label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            return None
        row = {"grid": name, "path": label, "fwd": f, "fwd_bwd": fb, "peak_gib": mem}
        rows.append(row)
        print(f"{label}: fwd {f:.1f} ms, fwd+bwd {fb:.1f} ms, peak {mem:.2f} GiB")
        return row

    dense = record("dense SDPA (no mask)", lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    fused = None
    if cuda and not args.no_flex:  # flex: compiled Triton kernels, no CPU backward
        fused = record("fused (library, flex)", lambda q, k, v: grid_attention(q, k, v, layout, mask, "flex"))
        lib = flex_kernel_options(q)
        print(f"library flex kernel options: {lib}")
        if not args.tiny:
            full = all_full_block_mask(N, dev)
            record(
                "flex, every block (kernel ceiling)",
                lambda q, k, v: compiled_flex()(q, k, v, block_mask=full, kernel_options=lib),
            )
    lse_rows = []
    if mask.is_view_or_time(layout):
        lse_rows = lse_variants(layout, mask, q, k, v, record)
    for label, opts in KERNEL_VARIANTS.items() if args.variants and cuda else ():
        fx = torch.compile(flex_attention, dynamic=False)
        record(f"flex {label}", lambda q, k, v, fx=fx, o=opts: fx(q, k, v, block_mask=bm, kernel_options=o))
    if args.variants and cuda:
        padded_variant(layout, mask, dev, record)
    ideal_f, ideal_fb = dense["fwd"] * frac, dense["fwd_bwd"] * frac
    print(
        f"ideal (dense x computed blocks): fwd {ideal_f:.1f} ms, fwd+bwd {ideal_fb:.1f} ms; "
        f"token ideal fwd {dense['fwd'] * density:.1f} ms, fwd+bwd {dense['fwd_bwd'] * density:.1f} ms"
    )
    print("\n| path | fwd ms | fwd+bwd ms | fwd / ideal | fwd+bwd / ideal | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['path']} | {r['fwd']:.1f} | {r['fwd_bwd']:.1f} | {r['fwd'] / ideal_f:.2f}x | "
            f"{r['fwd_bwd'] / ideal_fb:.2f}x | {r['peak_gib']:.2f} |"
        )
    for r in [fused, *lse_rows]:
        if r is not None:
            f, fb = r["fwd"], r["fwd_bwd"]
            print(
                f"{r['path']} / ideal: fwd {f / ideal_f:.2f}x, fwd+bwd {fb / ideal_fb:.2f}x; "
                f"dense / it: fwd {dense['fwd'] / f:.2f}x, fwd+bwd {dense['fwd_bwd'] / fb:.2f}x"
            )
    return rows


def lse_variants(layout: GridLayout, mask: ViewTimeMask, q, k, v, record) -> list[dict]:
    """The LSE path (library: grid_attention backend "lse", i.e. cuDNN on Hopper) and each of its
    kernels, after a parity check against flex (GPU) or dense SDPA (CPU); plus the share of pairs
    its two attentions compute (the mask's own: they are disjoint)."""
    V, Fr, n = layout.views, layout.frames, layout.frame_tokens
    pairs = V * (Fr * n) ** 2 + V * Fr * n * (V - 1) * n
    print(f"LSE path: its two attentions compute {pairs / layout.num_tokens**2:.4f} of all pairs")
    with torch.no_grad():
        got = grid_attention(q, k, v, layout, mask, "lse")
        if not q.is_cuda:
            err = (
                (got - F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(layout, q.device)))
                .abs()
                .max()
            )
        else:  # the rows of one (view, frame): its view's and its frame's keys gathered, plain SDPA in fp32
            vi, fi, n = V // 2, Fr // 2, layout.frame_tokens
            grid6 = [x.unflatten(2, (V, Fr, n)) for x in (q, k, v)]  # [B, H, V, F, S, D]
            rows_q = grid6[0][:, :, vi, fi].float()
            others = [u for u in range(V) if u != vi]
            keys = [
                torch.cat([x[:, :, vi].flatten(2, 3), x[:, :, others, fi].flatten(2, 3)], 2)
                for x in grid6[1:]
            ]
            ref = F.scaled_dot_product_attention(rows_q, keys[0].float(), keys[1].float())
            err = (got.unflatten(2, (V, Fr, n))[:, :, vi, fi].float() - ref).abs().max()
    against = "gathered keys, fp32" if q.is_cuda else "dense"
    print(f"LSE (library, {fused_kernel(q)}) vs {against}: max abs diff {float(err):.2e}")
    rows = [
        record(
            f"LSE (library, {fused_kernel(q)})", lambda q, k, v: grid_attention(q, k, v, layout, mask, "lse")
        )
    ]
    if q.is_cuda:  # the k/v copies on the main stream, side by side with the side stream
        from fourdgen.nn import lse_attention as la

        la.overlap_copies = False
        try:
            rows.append(
                record(
                    "LSE (library, copies not overlapped)",
                    lambda q, k, v: grid_attention(q, k, v, layout, mask, "lse"),
                )
            )
        finally:
            la.overlap_copies = True
    lse_breakdown(layout, q, k, v)
    for kernel in ("flash",) if q.is_cuda else ():
        rows.append(
            record(
                f"LSE, {kernel} kernel", lambda q, k, v, kn=kernel: view_time_attention(q, k, v, layout, kn)
            )
        )
    return [r for r in rows if r is not None]


def lse_breakdown(layout: GridLayout, q, k, v) -> None:
    """Where the LSE path's time goes: each part's kernels alone (forward, and their backward given
    the part's own output), the others part's copies (k and v cycled) and the merge."""
    from itertools import product

    from fourdgen.nn import attention_kernels as ak
    from fourdgen.nn import lse_attention as la

    V, Fr = layout.views, layout.frames
    kernel, scale = fused_kernel(q), q.shape[-1] ** -0.5
    fn = ak.KERNEL_FNS[kernel]
    q, k, v = q.detach(), k.detach(), v.detach()
    iters = 10
    print(f"LSE breakdown ({kernel}), ms:")
    qp, kp, vp = [la.view_batches(x, V) for x in (q, k, v)]
    ov, lv, aux = fn.fwd(qp, kp, vp, scale)
    do = torch.randn_like(ov)
    f = timed(lambda: fn.fwd(qp, kp, vp, scale), iters)
    b = timed(lambda: fn.bwd(do, qp, kp, vp, ov, lv, aux, scale), iters)
    flop = qp.shape[0] * qp.shape[2] * kp.shape[2] * qp.shape[1] * qp.shape[3] * 4
    print(
        f"  view: {qp.shape[0]} x {qp.shape[2]} tok, fwd {f:.2f}, bwd {b:.2f}, {flop / f / 1e9:.0f} TFLOP/s"
    )

    def copies():
        return la.cycled(k, V, Fr), la.cycled(v, V, Fr)

    qf = la.frame_batches(q, V, Fr)
    kc, vc = copies()
    calls = [(qf[i, j], kc[i, j], vc[i, j]) for i, j in product(range(q.shape[0]), range(Fr))]
    res = [fn.fwd(*c, scale, V) for c in calls]
    dos = [torch.randn_like(r[0]) for r in res]
    f = timed(lambda: [fn.fwd(*c, scale, V) for c in calls], iters)
    b = timed(
        lambda: [fn.bwd(d, *c, r[0], r[1], r[2], scale, V) for d, c, r in zip(dos, calls, res, strict=True)],
        iters,
    )
    q1, k1 = calls[0][0], ak.windows(calls[0][1], V)
    flop = len(calls) * q1.shape[0] * q1.shape[2] * k1.shape[2] * q1.shape[1] * q1.shape[3] * 4
    print(
        f"  others: {len(calls)} calls of {q1.shape[0]} x {q1.shape[2]} queries x {k1.shape[2]} keys, "
        f"fwd {f:.2f}, bwd {b:.2f} (window gradients not folded), fwd {flop / f / 1e9:.0f} TFLOP/s"
    )
    print(f"  copies (k and v cycled): {timed(copies, iters):.2f}")
    folded = la._pointwise(la.fold, q)
    dk = fn.bwd(dos[0], *calls[0], res[0][0], res[0][1], res[0][2], scale, V)[1]
    fold_ms = timed(lambda: folded(dk, V), iters)
    print(f"  fold of one frame's window gradients (2 per frame: k and v): {fold_ms:.3f}")
    hi = la._heads_inner(q)
    oo = torch.stack([r[0] for r in res]).unflatten(0, (q.shape[0], Fr))
    lo = torch.stack([r[1] for r in res]).unflatten(0, (q.shape[0], Fr))
    args = (
        la._physical(la.view_grid(ov, V, Fr), hi),
        la._physical(la._others_grid(oo), hi),
        la._physical(la.view_grid(lv[..., None], V, Fr), hi)[..., 0],
        la._physical(la._others_grid(lo)[..., None], hi)[..., 0],
    )
    merge = la._pointwise(la.merge, q)
    print(f"  merge (compiled on CUDA): {timed(lambda: merge(*args), iters):.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    p.add_argument("--heads", type=int, default=None, help="override the grid's head count")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--variants", action="store_true", help="also flex kernel options and padded frames")
    p.add_argument(
        "--heads-inner", action="store_true", help="q/k/v stored [B, N, H, D] (as the DiT's projections)"
    )
    p.add_argument(
        "--no-flex", action="store_true", help="skip the flex rows (their compilation takes a minute)"
    )
    p.add_argument("--tiny", action="store_true", help="one small grid (also on CPU, float32): a smoke run")
    args = p.parse_args()
    if torch.cuda.is_available():
        print(torch.cuda.get_device_name(), "torch", torch.__version__)
        compiled_flex()  # raises dynamo's recompile limit: the variants below all compile flex_attention
    else:
        print("CPU (no CUDA): flex rows skipped, float32, wall-clock times; torch", torch.__version__)
        if not args.tiny:
            p.error("no CUDA device: only --tiny runs on the CPU")
    grids = {"tiny": TINY} if args.tiny else {name: GRIDS[name] for name in args.grid}
    for name, spec in grids.items():
        bench_grid(name, spec, args)


if __name__ == "__main__":
    main()
