"""``fourdgen export``: the trained adapter of a stage-1 checkpoint in diffusers' LoRA format, on CPU.

::

    fourdgen export outputs/4dnex/checkpoints/last.ckpt --out outputs/4dnex/lora/last
    fourdgen export outputs/4dnex/checkpoints/last.ckpt --out lora/ --transformer '{path: /models/Wan2.1}'

The checkpoint is a Lightning file or the folder that ``ModelParallelStrategy`` (FSDP2) writes; a
folder is consolidated in memory (no GPU, no process group). The stage is rebuilt from the
checkpoint's hyper-parameters with its frozen base on the meta device: only the base's
``config.json`` is read, never its weights. ``--out`` gets what ``LoraExport`` writes at the end of a
fit: ``pytorch_lora_weights.safetensors`` (diffusers' format) and ``fourdgen_extra.safetensors``
(domain embeddings and other new trained tensors), which ``init_lora`` and ``load_lora`` load.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from fourdgen.checkpoints import checkpoint_metadata, read_checkpoint
from fourdgen.errors import ConfigError
from fourdgen.io import check_checkpoint_file, claim_output_dir, write_manifest

WRITER = "fourdgen export"


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, overwrite: bool = False, model_class=None, **overrides
) -> Path:
    """Write the adapter of ``checkpoint`` (file or sharded folder) to ``out``; ``overrides`` replace
    the checkpoint's hyper-parameters (``transformer``/``vae`` when its paths are another machine's)."""
    from fourdgen.stages.dit import DiTFinetune

    check_checkpoint_file(checkpoint, what="checkpoint")
    step = int(checkpoint_metadata(checkpoint).get("global_step", 0))
    out = Path(out)
    claim_output_dir(out, WRITER, step, overwrite, what="--out")
    model = DiTFinetune.from_checkpoint(read_checkpoint(checkpoint), checkpoint, model_class, **overrides)
    if not model.export_adapter(out):
        raise ConfigError(
            f"{checkpoint}: {type(model).__name__} was fully fine-tuned (no adapter): the checkpoint itself "
            "holds the trained weights, there is no LoRA to export"
        )
    write_manifest(out, WRITER, step=step, checkpoint=str(checkpoint))
    return out


def _spec(text: str) -> dict:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{path: /models/Wan}}', got {text!r}")
    return value


def main(argv: list[str] | None = None) -> None:
    doc = __doc__.split("::")
    p = argparse.ArgumentParser(
        prog="fourdgen export",
        description=doc[0].strip(),
        epilog="examples:\n" + doc[1].split("\n\n", 2)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("checkpoint", help="a stage-1 Lightning checkpoint: a .ckpt file or a sharded folder")
    p.add_argument("--out", required=True, help="the adapter folder to write")
    p.add_argument("--transformer", type=_spec, help="replaces the checkpoint's base DiT spec (YAML mapping)")
    p.add_argument("--vae", type=_spec, help="replaces the checkpoint's VAE spec (YAML mapping)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export or foreign files")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("transformer", args.transformer), ("vae", args.vae)) if v is not None}
    out = export_checkpoint(args.checkpoint, args.out, args.overwrite, **overrides)
    print(f"fourdgen: wrote the adapter of {args.checkpoint} to {out.resolve()}")
