"""``fourdgen generate``: one image or one video in, a 4D scene out.

::

    fourdgen generate --pipeline lightning_configs/pipelines/image_to_4d.yaml --input cat.png \\
        --prompt "a cat jumping" --out runs/cat
    fourdgen generate --pipeline lightning_configs/pipelines/video_to_4d.yaml --input clip.mp4 --out runs/clip
    fourdgen generate ... --resume                      # continue: finished steps are kept
    fourdgen generate ... --weights video=/ckpt/last.ckpt   # replace one of the pipeline's weights
    fourdgen generate ... --set video.model.init_args.sample_steps=25   # one step's option
"""

from __future__ import annotations

from jsonargparse import ArgumentParser

from fourdgen.errors import ConfigError


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="fourdgen generate", description=__doc__.split("::")[0].strip())
    p.add_argument(
        "--pipeline", required=True, help="a pipeline file (lightning_configs/pipelines/<name>.yaml)"
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="an image, a folder of frames, a video (mp4/mov/webm) or a scene folder; grid_to_gaussians "
        "takes a fixed-view video and a freeze-time video",
    )
    p.add_argument("--out", required=True, help="the run's folder (generate.json and one folder per step)")
    p.add_argument("--resume", action="store_true", help="continue a run in --out, keeping finished steps")
    p.add_argument("--prompt", default="", help="text prompt (the imported scene's caption)")
    p.add_argument(
        "--weights",
        action="append",
        default=[],
        help="NAME=PATH: replace one of the pipeline's named weights (repeatable)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="STEP.KEY=VALUE: add or replace one of a step's args (a CLI key of a predict/fit step, an "
        "option of a tool step), e.g. video.model.init_args.sample_steps=25 (repeatable)",
    )
    p.add_argument("--num_threads", type=int | None, default=None, help="torch intra-op CPU threads")
    return p


def _weights(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--weights {item!r}: expected NAME=PATH")
        out[name] = path
    return out


def main(argv: list[str]) -> dict:
    """Run ``fourdgen generate <argv>``; returns the ``generate.json`` record."""
    import torch

    from fourdgen.generate.runner import Run

    args = parser().parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    run = Run(args.pipeline, args.input, args.out, args.resume, args.prompt, _weights(args.weights), args.set)
    return run.run()
