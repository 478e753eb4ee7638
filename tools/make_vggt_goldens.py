"""Record golden outputs of the official VGGT code (facebookresearch/vggt) for the CI parity tests.

    python tools/make_vggt_goldens.py PATH/TO/VGGT_SOURCE [--out FILE] [--commit SHA]

``PATH/TO/VGGT_SOURCE`` is a folder holding the official ``vggt/`` package (a clone of
facebookresearch/vggt, or ``.ref``); it is imported from there and never vendored. The script
builds the same two small official models as the skip-if-absent parity tests
(``tests/test_vggt.py::test_matches_the_official_implementation`` and
``tests/test_vggt_track.py::test_matches_official``), gives them seed-derived weights
(:func:`seeded_weights`: a function of the key names and shapes, the seed and a gain alone, so
the tests regenerate them without storing 60M parameters), runs them on seed-derived inputs, writes
inputs and outputs to one ``.safetensors`` file (inputs in float16, exact; outputs in float32).
The file's metadata records the seed, the sizes, the source commit (``--commit``) and a digest of
the official state dict's key names and shapes.

``tests/test_vggt.py::test_matches_recorded_official_outputs`` and
``tests/test_vggt_track.py::test_matches_recorded_official_outputs`` load fourdgen's models with the
same weights and compare, on every CI run. The functions above ``main`` need neither the official
source nor this being run: the tests import them from this file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SEED = 0
# Weight gains (see seeded_tensor): 1.7 spreads the DPT outputs (PyTorch's default scale, gain 1,
# leaves depth within 1 +- 0.01). The track head's iterations amplify rounding (a 1e-6 change of
# the tokens moved the last tracks by 1e-2 at gain 1) unless its flow head is small, as the
# official init has it (std 0.001): scaled by 0.1 the tracks still move about a pixel and a 1e-6
# change stays about 10x below the tolerance.
VGGT_GAIN, TRACK_GAIN = 1.7, 1.0
TRACK_SCALES = {"tracker.updateformer.flow_head.": 0.1}
VGGT_INPUT = (1, 3, 3, 28, 42)  # B, S, 3, H, W: non-square, off DINOv2's 4 x 4 grid (56 px)
VGGT_OUTPUTS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")
# Official module arguments, the same as the skip-if-absent parity tests'.
AGGREGATOR = dict(
    img_size=56, patch_size=14, embed_dim=384, depth=3, num_heads=6, patch_embed="dinov2_vits14_reg"
)
CAMERA_HEAD = dict(dim_in=768, trunk_depth=2, num_heads=6)
DPT = dict(dim_in=768, intermediate_layer_idx=[0, 1, 2, 2], features=32, out_channels=[16, 32, 64, 64])
TRACK_HEAD = dict(dim_in=32, features=16, hidden_size=32, corr_levels=3, corr_radius=2, iters=3)
TRACK_INPUT = dict(B=1, S=3, H=28, W=42, N=7, patch_start_idx=5, layers=24)
CONFIG = {
    "vggt_gain": VGGT_GAIN,
    "track_gain": TRACK_GAIN,
    "track_scales": TRACK_SCALES,
    "vggt_input": VGGT_INPUT,
    "aggregator": AGGREGATOR,
    "camera_head": CAMERA_HEAD,
    "dpt": DPT,
    "track_head": TRACK_HEAD,
    "track_input": TRACK_INPUT,
}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "vggt_goldens.safetensors"


def seeded_tensor(name: str, shape: tuple[int, ...], seed: int = SEED, gain: float = 1.0) -> Tensor:
    """A float32 tensor of ``shape`` determined by ``name``, ``shape``, ``seed`` and ``gain`` only.

    numpy's legacy ``RandomState`` stream is frozen across versions and platforms, so the values
    are the same wherever they are drawn: uniform in [-1, 1), then scaled by the kind of weight the
    name and shape suggest. Matrices and convolution kernels (ndim >= 2) get the bound
    ``gain / sqrt(fan_in)`` (``fan_in = prod(shape[1:])``; ``gain=1`` is PyTorch's default init);
    1-D ``weight`` (norms) ``1 +- 0.1``; 1-D ``bias`` ``+- 0.1``; anything else (tokens, position
    embeddings, layer-scale ``gamma``) ``+- 0.5`` so that it matters (such tensors start tiny or
    zero in both implementations).
    """
    rs = np.random.RandomState(zlib.crc32(f"{seed}/{name}".encode()))
    u = rs.uniform(-1.0, 1.0, size=shape)
    leaf = name.rsplit(".", 1)[-1]
    if not (leaf.endswith("weight") or leaf.endswith("bias")):
        values = 0.5 * u
    elif len(shape) >= 2:
        values = u * (gain / math.sqrt(max(math.prod(shape[1:]), 1)))
    elif leaf.endswith("weight"):
        values = 1.0 + 0.1 * u
    else:
        values = 0.1 * u
    return torch.from_numpy(values).float()


def seeded_weights(
    shapes: dict[str, tuple[int, ...]],
    seed: int = SEED,
    gain: float = 1.0,
    scales: dict[str, float] | None = None,
) -> dict[str, Tensor]:
    """``{name: seeded_tensor(name, shape, seed, gain)}`` for a state dict's ``{name: shape}``,
    times ``scales[prefix]`` for the names starting with a prefix of ``scales``."""
    out = {k: seeded_tensor(k, tuple(s), seed, gain) for k, s in shapes.items()}
    for prefix, factor in (scales or {}).items():
        hits = [k for k in out if k.startswith(prefix)]
        if not hits:
            raise KeyError(f"scales: no weight starts with {prefix!r}")
        for k in hits:
            out[k] = out[k] * factor
    return out


def layout_digest(shapes: dict[str, tuple[int, ...]]) -> str:
    """sha256 of the sorted ``name:shape`` lines of a state dict (its layout, not its values)."""
    lines = "\n".join(f"{k}:{list(shapes[k])}" for k in sorted(shapes))
    return hashlib.sha256(lines.encode()).hexdigest()


def seeded_inputs(seed: int = SEED) -> dict[str, Tensor]:
    """The recorded inputs (float16-exact values, returned as float16).

    ``vggt.images [B, S, 3, H, W]`` in [0, 1); ``track.tokens [layers, B, S, P, C]`` (the
    aggregator's token list, stacked; ``P = patch_start_idx + (H / 14) (W / 14)``) and
    ``track.query [B, N, 2]`` pixel positions.
    """
    rs = np.random.RandomState(seed)
    t = TRACK_INPUT
    P = t["patch_start_idx"] + (t["H"] // 14) * (t["W"] // 14)
    images = rs.uniform(0.0, 1.0, size=VGGT_INPUT)
    tokens = rs.standard_normal((t["layers"], t["B"], t["S"], P, TRACK_HEAD["dim_in"]))
    query = rs.uniform(0.0, 1.0, size=(t["B"], t["N"], 2)) * [t["W"] - 1.0, t["H"] - 1.0]
    return {
        "vggt.images": torch.from_numpy(images).half(),
        "track.tokens": torch.from_numpy(tokens).half(),
        "track.query": torch.from_numpy(query).half(),
    }


# ------------------------------------------------------------------ needs the official source
def official_vggt():
    """The official VGGT of the parity test (aggregator, camera, point and depth heads)."""
    from vggt.heads.camera_head import CameraHead
    from vggt.heads.dpt_head import DPTHead
    from vggt.models.aggregator import Aggregator
    from vggt.models.vggt import VGGT as Official

    ref = Official.__new__(Official)
    torch.nn.Module.__init__(ref)
    ref.aggregator = Aggregator(**AGGREGATOR)
    ref.camera_head = CameraHead(**CAMERA_HEAD)
    ref.point_head = DPTHead(output_dim=4, activation="inv_log", conf_activation="expp1", **DPT)
    ref.depth_head = DPTHead(output_dim=2, activation="exp", conf_activation="expp1", **DPT)
    ref.track_head = None
    return ref.eval()


def official_track_head():
    from vggt.heads.track_head import TrackHead

    return TrackHead(**TRACK_HEAD).eval()


def _load_seeded(model: torch.nn.Module, gain: float, scales: dict[str, float] | None = None) -> str:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(seeded_weights(shapes, gain=gain, scales=scales), strict=True)
    return layout_digest(shapes)


def record() -> tuple[dict[str, Tensor], dict[str, str]]:
    """Run the official models on the seeded inputs: ``(tensors, metadata)``."""
    inputs = seeded_inputs()
    out = dict(inputs)
    meta = {"seed": str(SEED)}
    vggt = official_vggt()
    meta["vggt.layout_sha256"] = _load_seeded(vggt, VGGT_GAIN)
    with torch.no_grad():
        pred = vggt(inputs["vggt.images"].float())
    out.update({f"vggt.{k}": pred[k].float().contiguous() for k in VGGT_OUTPUTS})
    head = official_track_head()
    meta["track.layout_sha256"] = _load_seeded(head, TRACK_GAIN, TRACK_SCALES)
    t = TRACK_INPUT
    images = torch.zeros(t["B"], t["S"], 3, t["H"], t["W"])  # the official head reads their shape only
    with torch.no_grad():
        tracks, vis, conf = head(
            list(inputs["track.tokens"].float()),
            images,
            t["patch_start_idx"],
            query_points=inputs["track.query"].float(),
        )
    out["track.tracks"] = torch.stack(tracks).contiguous()  # [iters, B, S, N, 2]
    out["track.vis"], out["track.conf"] = vis.contiguous(), conf.contiguous()
    meta["config"] = json.dumps(CONFIG)
    for k, v in out.items():
        if not torch.isfinite(v.float()).all():
            raise RuntimeError(f"official output {k} is not finite: change the seed or the scales")
    return out, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="folder holding the official vggt/ package (facebookresearch/vggt)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output .safetensors (default: %(default)s)")
    p.add_argument("--commit", default="", help="the official source's commit, recorded in the metadata")
    args = p.parse_args(argv)
    source = Path(args.source).resolve()
    if not (source / "vggt" / "models" / "vggt.py").is_file():
        print(f"error: no vggt/ package in {source}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(source))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from safetensors.torch import save_file

    tensors, meta = record()
    meta["source_commit"] = args.commit
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata=meta)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {len(tensors)} tensors, {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
