"""``fourdgen eval``: a folder of predictions scored on a paper's protocol, printed as its table.

::

    fourdgen eval depth sintel --gt data/MPI-Sintel --pred runs/sintel_depth [--align scale_shift]
    fourdgen eval depth bonn --gt data/bonn --pred runs/bonn_depth
    fourdgen eval cameras sintel --gt data/MPI-Sintel --pred runs/sintel_cams
    fourdgen eval cameras tum --gt data/tum --pred runs/tum_cams
    fourdgen eval n3dv --gt scenes/coffee --pred outputs/full4d/scene/renders/view_00.mp4
    fourdgen eval dycheck --gt data/iphone/apple --pred runs/apple/val --scale 2 --lpips_weights alexnet.pth
    fourdgen eval video --fake runs/gen --real data/real --i3d i3d_torchscript.pt --clip clip-vit-b-32/

Prediction layouts: :mod:`fourdgen.evaluation.predictions`. ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fourdgen.evaluation.cameras import evaluate_cameras
from fourdgen.evaluation.depth import evaluate_depth
from fourdgen.evaluation.video import evaluate_video
from fourdgen.evaluation.views import evaluate_dycheck, evaluate_n3dv
from fourdgen.io import write_json
from fourdgen.metrics.video_depth import ALIGNMENTS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fourdgen eval",
        description=__doc__.split("::")[0].strip(),
        epilog="examples:\n" + __doc__.split("::")[1].split("\n\n", 2)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="protocol", required=True, metavar="protocol")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, allow_abbrev=False)
        s.add_argument("--json", default=None, help="also write the results to this JSON file")
        return s

    d = add("depth", "video depth, One4D table 3 (AbsRel, delta < 1.25)")
    d.add_argument("dataset", choices=("sintel", "bonn"))
    d.add_argument("--align", choices=ALIGNMENTS, default="scale", help="per-sequence alignment")
    c = add("cameras", "camera trajectories, One4D table 4 (ATE, RPE-T, RPE-R)")
    c.add_argument("dataset", choices=("sintel", "tum"))
    for s in (d, c):
        s.add_argument("--gt", required=True, help="the dataset's root folder")
        s.add_argument("--pred", required=True, help="the predictions' folder")
        s.add_argument("--sequences", nargs="+", default=None, help="only these sequences")
    n = add("n3dv", "N3DV held-out camera (PSNR, SSIM, LPIPS)")
    n.add_argument("--gt", required=True, help="the imported N3DV scene")
    n.add_argument("--pred", required=True, help="renders of the held-out view: a frame folder or an mp4")
    n.add_argument("--view", default="cam00")
    y = add("dycheck", "DyCheck masked metrics on co-visible pixels (mPSNR, mSSIM, mLPIPS)")
    y.add_argument("--gt", required=True, help="the DyCheck capture folder")
    y.add_argument("--pred", required=True, help="folder of <frame_name>.png renders of the split")
    y.add_argument("--scale", type=int, default=1, help="rgb/<scale>x resolution")
    y.add_argument("--split", default="val")
    for s in (n, y):
        s.add_argument("--lpips_weights", default=None, help="local torchvision AlexNet weights for LPIPS")
    v = add("video", "generated videos, Full-4D table 1 (FVD, CLIP-F, CLIP-V)")
    v.add_argument("--fake", required=True, help="folder of generated videos")
    v.add_argument("--real", default=None, help="folder of real videos (FVD)")
    v.add_argument("--i3d", default=None, help="local TorchScript I3D (FVD)")
    v.add_argument("--clip", default=None, help="local transformers CLIP vision folder (CLIP-F / CLIP-V)")
    v.add_argument("--inputs", default=None, help="folder of input videos, same names (CLIP-V)")
    v.add_argument("--device", default="cpu")
    return p


def _fmt(x: float, pct: bool = False) -> str:
    if isinstance(x, int):
        return str(x)
    return "nan" if math.isnan(x) else (f"{100 * x:.1f}" if pct else f"{x:.4f}")


def table(columns: list[tuple[str, str, bool]], rows: dict[str, dict]) -> str:
    """A markdown table: ``columns`` = (title, key, as percent), one row per entry of ``rows``."""
    lines = ["| " + " | ".join(["sequence"] + [c[0] for c in columns]) + " |"]
    lines.append("|" + "---|" * (len(columns) + 1))
    for name, r in rows.items():
        lines.append(
            "| " + " | ".join([name] + [_fmt(r[k], pct) if k in r else "-" for _, k, pct in columns]) + " |"
        )
    return "\n".join(lines)


COLUMNS = {
    "depth": [
        ("Abs Rel", "abs_rel", False),
        ("δ<1.25 (%)", "delta1", True),
        ("valid px", "valid_pixels", False),
    ],
    "cameras": [("ATE", "ate", False), ("RPE-T", "rpe_t", False), ("RPE-R (deg)", "rpe_r", False)],
    "n3dv": [("PSNR", "psnr", False), ("SSIM", "ssim", False), ("LPIPS", "lpips", False)],
    "dycheck": [("mPSNR", "mpsnr", False), ("mSSIM", "mssim", False), ("mLPIPS", "mlpips", False)],
    "video": [("FVD", "fvd", False), ("CLIP-F", "clip_f", False), ("CLIP-V", "clip_v", False)],
}


def run(args: argparse.Namespace) -> dict:
    if args.protocol == "depth":
        return evaluate_depth(args.dataset, args.gt, args.pred, args.align, args.sequences)
    if args.protocol == "cameras":
        return evaluate_cameras(args.dataset, args.gt, args.pred, args.sequences)
    if args.protocol == "n3dv":
        return {args.view: evaluate_n3dv(args.gt, args.pred, args.view, args.lpips_weights)}
    if args.protocol == "dycheck":
        return {
            Path(args.gt).name: evaluate_dycheck(
                args.gt, args.pred, args.scale, args.split, args.lpips_weights
            )
        }
    return {
        Path(args.fake).name: evaluate_video(
            args.fake, args.real, args.i3d, args.clip, args.inputs, args.device
        )
    }


def main(argv: list[str] | None = None) -> dict:
    """Parse, evaluate, print the table (and write ``--json``); returns the results."""
    args = parser().parse_args(argv)
    results = run(args)
    title = args.protocol + (f" {args.dataset}" if hasattr(args, "dataset") else "")
    print(f"fourdgen eval {title}\n{table(COLUMNS[args.protocol], results)}")
    if args.json:
        write_json(Path(args.json), results)
    return results


if __name__ == "__main__":
    main()
