"""Checks of a pipeline before any step runs: every weight it names exists, and the clip sizes of
the Wan steps are ones their VAE and DiT take. Each failure is one :class:`ConfigError` naming the
step and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fourdgen.config_checks import vae_factors, weight_paths
from fourdgen.errors import ConfigError


def check_weights(cfg: dict[str, Any], where: str, step: str) -> None:
    """Every weight path in the resolved config ``cfg`` exists (nothing is downloaded)."""
    for key, path in weight_paths(cfg):
        if not Path(path).exists():
            raise ConfigError(
                f"{where}: {key}: {path} does not exist (weights are read from local paths, nothing is "
                f"downloaded; point it at your copy with --set {step}.{key}=PATH)"
            )


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
