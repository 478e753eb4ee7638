"""``fourdgen import <format> <src> <dst>``: a dataset in its own layout -> a fourdgen scene.

::

    fourdgen import nerfstudio data/lego/transforms_train.json scenes/lego   # or a D-NeRF folder
    fourdgen import colmap data/garden scenes/garden --downscale 4          # sparse/0 + images/
    fourdgen import n3dv data/coffee_martini scenes/coffee --downscale 2 --frames 300
    fourdgen import dycheck data/iphone/apple scenes/apple --scale 2        # train/ and val_<cam>/
"""

from __future__ import annotations

import argparse
import importlib

from fourdgen.errors import ConfigError
from fourdgen.importers import FORMATS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fourdgen import",
        description=__doc__.split("::")[0].strip(),
        epilog="examples:\n" + __doc__.split("::")[1].split("\n\n", 2)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="format", metavar="format", required=True, help=", ".join(FORMATS))
    for name, module in FORMATS.items():
        mod = importlib.import_module(module)
        s = sub.add_parser(name, help=(mod.__doc__ or "").splitlines()[0], allow_abbrev=False)
        s.add_argument("src", help="the dataset folder (or its file)")
        s.add_argument("dst", help="the scene folder to write")
        s.add_argument("--downscale", type=int, default=1, help="integer image downscale (K follows)")
        s.add_argument("--frames", type=int, default=None, help="import at most this many timesteps")
        s.add_argument("--frame_format", choices=("png", "jpg", "mp4"), default="png")
        s.add_argument("--overwrite", action="store_true", help="replace files in dst")
        s.add_argument("--fps", type=float, default=None, help="frame rate (default: the dataset's, else 30)")
        mod.add_arguments(s)
    return p


def main(argv: list[str] | None = None) -> list:
    """Parse ``argv`` and import; prints the scene folders written and returns them."""
    args = parser().parse_args(argv)  # argparse's own usage errors exit 2
    if args.downscale < 1:
        raise ConfigError(f"--downscale: expected a positive integer, got {args.downscale}")
    opts = vars(args)
    fmt, src, dst = opts.pop("format"), opts.pop("src"), opts.pop("dst")
    opts["downscale_factor"] = opts.pop("downscale")
    opts["max_frames"] = opts.pop("frames")
    if opts["fps"] is None:
        del opts["fps"]  # each format's own default (the videos', extra.json's, or 30)
    mod = importlib.import_module(FORMATS[fmt])
    out = mod.import_scene(src, dst, **opts)
    for path in out:
        print(f"fourdgen import {fmt}: wrote {path}")
    return out
