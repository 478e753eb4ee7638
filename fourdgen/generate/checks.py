"""Checks of a pipeline before any step runs: every weight it names exists, and the clip sizes of
the Wan steps are ones their VAE and DiT take. Each failure is one :class:`ConfigError` naming the
step and the key."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from fourdgen.errors import ConfigError
from fourdgen.generate.stages import weight_paths


def check_weights(cfg: dict[str, Any], where: str, step: str) -> None:
    """Every weight path in the resolved config ``cfg`` exists (nothing is downloaded)."""
    for key, path in weight_paths(cfg):
        if not Path(path).exists():
            raise ConfigError(
                f"{where}: {key}: {path} does not exist (weights are read from local paths, nothing is "
                f"downloaded; point it at your copy with --set {step}.{key}=PATH)"
            )


def vae_factors(spec: dict[str, Any] | None) -> tuple[int, int] | None:
    """(temporal, spatial) down-sampling of a ``build_vae`` spec, from its config alone (no weights
    are loaded); None when the spec says nothing we can read."""
    from diffusers import AutoencoderKLWan

    from fourdgen.backbones.wan import VAE_PRESETS

    if not spec:
        return None
    if spec.get("path"):
        file = Path(spec["path"]) / spec.get("subfolder", "vae") / "config.json"
        if not file.is_file():
            return None  # check_weights names the missing checkpoint
        cfg = json.loads(file.read_text())
    elif spec.get("preset") in VAE_PRESETS:
        cfg = dict(VAE_PRESETS[spec["preset"]])
    else:
        return None
    defaults = inspect.signature(AutoencoderKLWan.__init__).parameters
    down = cfg.get("temperal_downsample", defaults["temperal_downsample"].default)
    patch = cfg.get("patch_size", defaults["patch_size"].default) or 1
    return 2 ** sum(bool(d) for d in down), 2 ** len(down) * patch


def check_clip_size(cfg: dict[str, Any], where: str) -> None:
    """A Wan step's ``data.init_args`` frame count is ``t * k + 1`` (the VAE's temporal factor
    ``t``) and its height and width are multiples of the VAE's spatial factor times the DiT's
    2 x 2 patch."""
    model = (cfg.get("model") or {}).get("init_args") or {}
    data = (cfg.get("data") or {}).get("init_args") or {}
    factors = vae_factors(model.get("vae"))
    if factors is None:
        return
    t, s = factors
    T = data.get("num_frames")
    if isinstance(T, int) and (T - 1) % t:
        lo = (T - 1) // t * t + 1
        raise ConfigError(
            f"{where}: data.init_args.num_frames = {T}, but the VAE takes {t}k+1 frames (temporal factor "
            f"{t}): use {lo} or {lo + t}"
        )
    for key in ("height", "width"):
        v = data.get(key)
        if isinstance(v, int) and v % (2 * s):
            raise ConfigError(
                f"{where}: data.init_args.{key} = {v} is not a multiple of {2 * s} (VAE spatial factor {s} "
                "x the DiT's 2 x 2 patch)"
            )
