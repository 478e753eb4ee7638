"""Save a Lightning checkpoint of a recipe's model with random (seeded) trainable weights, without
training: for timing and smoke runs of ``fourdgen predict`` / ``fourdgen generate`` at preset sizes
where no trained checkpoint exists (``predict`` refuses a model without trained weights).

    python tools/random_checkpoint.py --config lightning_configs/video/4dnex.yaml \\
        --model.init_args.transformer '{preset: 14b-i2v}' --model.init_args.vae '{preset: wan2.1}' \\
        --out outputs/random/4dnex.ckpt

The arguments after ``--config`` are the recipe's overrides, as for ``fourdgen fit``. The outputs of
a model saved this way are noise: this measures time and memory, nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fourdgen.cli import FourDGenCLI


def save_random_checkpoint(args: list[str], out: str | Path) -> Path:
    """Build the recipe's model (``args``: ``--config ...`` and overrides, no subcommand), set it up
    as ``fit`` would (``configure_model``) and write its checkpoint to ``out``."""
    cli = FourDGenCLI(args=[*args, "--trainer.logger=false"], run=False)
    model, trainer = cli.model, cli.trainer
    # On the GPU where there is one: a 14B model's random init takes minutes on CPU cores.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model.configure_model()
    trainer.strategy.connect(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(out)
    return out


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv or argv.index("--out") + 1 >= len(argv):
        sys.exit(__doc__)
    i = argv.index("--out")
    print(save_random_checkpoint(argv[:i] + argv[i + 2 :], argv[i + 1]))
