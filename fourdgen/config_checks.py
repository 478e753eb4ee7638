"""Checks of a parsed recipe before anything is built: weight files that are not there, preset
names, fused-attention mask terms the coupling's layout cannot provide, and clip sizes the Wan VAE
cannot take. Each fault is one :class:`~fourdgen.errors.ConfigError` naming the config key (as
``--key`` spells it) and what it accepts.

:class:`~fourdgen.cli.FourDGenCLI` runs :func:`check_config` after parsing, before any class is
instantiated: otherwise these faults surface only after data preparation and model construction, as
messages that name a function (``build_transformer: preset ...``) instead of the key to fix.
``fourdgen generate`` shares the weight keys and VAE factors (:mod:`fourdgen.generate.checks`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fourdgen.errors import ConfigError

# Config keys that name weights to load (local files or folders); output folders are not among them.
WEIGHT_KEYS = (
    "path",
    "checkpoint",
    "vggt_checkpoint",
    "init_checkpoint",
    "init_lora",
    "depth_model",
    "lpips_weights",
    "lpips_loss_weights",
    "ckpt_path",
)
# A weight key its stage never reads while the sibling keys say so: LPIPS weights without an LPIPS
# network (``lpips_net: null``, as prediction steps set), or an LPIPS loss of weight 0.
UNUSED_WHEN = {
    "lpips_weights": lambda c: c.get("lpips_net", "") is None,
    "lpips_loss_weights": lambda c: c.get("lpips_loss_net", "") is None or c.get("lpips_weight") == 0,
}
# Read only when training starts (the reconstructor's setup("fit")): other subcommands never open them.
FIT_ONLY_WEIGHTS = ("init_checkpoint", "vggt_checkpoint")


def weight_paths(cfg: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(key, path)`` of every weight the config names (keys in :data:`WEIGHT_KEYS`, string values)."""
    found: list[tuple[str, str]] = []
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            key = f"{prefix}.{k}" if prefix else k
            if k in WEIGHT_KEYS and isinstance(v, str) and v:
                if not (k in UNUSED_WHEN and UNUSED_WHEN[k](cfg)):
                    found.append((key, v))
            else:
                found += weight_paths(v, key)
    elif isinstance(cfg, list):
        for i, v in enumerate(cfg):
            found += weight_paths(v, f"{prefix}[{i}]")
    return found


def vae_factors(spec: dict[str, Any] | None) -> tuple[int, int] | None:
    """(temporal, spatial) down-sampling of a ``build_vae`` spec, from its config alone (no weights
    are loaded); None when the spec says nothing we can read."""
    from diffusers import AutoencoderKLWan

    from fourdgen.backbones.wan import VAE_PRESETS

    if not spec:
        return None
    if spec.get("path"):
        file = Path(spec["path"]) / (spec.get("subfolder", "vae") or "") / "config.json"
        if not file.is_file():
            return None  # the weight checks name the missing checkpoint
        cfg = json.loads(file.read_text())
    elif spec.get("preset") in VAE_PRESETS:
        cfg = dict(VAE_PRESETS[spec["preset"]])
    else:
        return None
    defaults = inspect.signature(AutoencoderKLWan.__init__).parameters
    down = cfg.get("temperal_downsample", defaults["temperal_downsample"].default)
    patch = cfg.get("patch_size", defaults["patch_size"].default) or 1
    return 2 ** sum(bool(d) for d in down), 2 ** len(down) * patch


# ------------------------------------------------------------------------------------ helpers
def _args(spec: dict) -> dict:
    """A ``class_path`` spec's arguments (a checkpoint's re-parsed hyper-parameters: dict_kwargs)."""
    return {**(spec.get("init_args") or {}), **(spec.get("dict_kwargs") or {})}


def _class(spec: Any) -> type | None:
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        return None
    module, _, name = spec["class_path"].rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # the parser has already said what it thinks of the class path


def _nodes(node: Any, key: str) -> Iterator[tuple[str, dict]]:
    """Every dict in ``node`` with its dotted key, depth first (lists as ``key[i]``)."""
    if isinstance(node, dict):
        yield key, node
        for k, v in node.items():
            yield from _nodes(v, f"{key}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _nodes(v, f"{key}[{i}]")


def _one_of(key: str, value: Any, allowed: list[str]) -> ConfigError:
    folded = {a.lower(): a for a in allowed}
    close = [folded[str(value).lower()]] if str(value).lower() in folded else []
    close = close or difflib.get_close_matches(str(value), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}{hint}")


# ------------------------------------------------------------------------------------- checks
def check_weight_files(sections: dict[str, Any], subcommand: str | None) -> None:
    """Every weight path the model and data sections name exists (nothing is downloaded)."""
    for key, path in weight_paths(sections):
        name = key.rsplit(".", 1)[-1]
        if name == "ckpt_path" or (name in FIT_ONLY_WEIGHTS and subcommand != "fit"):
            continue
        if not Path(path).exists():
            raise ConfigError(
                f"{key}: {path} does not exist (weights are read from local paths; nothing is downloaded)"
            )


def check_wan_specs(sections: dict[str, Any]) -> None:
    """``transformer`` / ``vae`` specs (``build_transformer`` / ``build_vae`` keywords): known keys, a
    local diffusers checkpoint folder or a known preset."""
    from fourdgen.backbones import wan

    kinds = {
        "transformer": (wan.build_transformer, wan.TRANSFORMER_PRESETS),
        "vae": (wan.build_vae, wan.VAE_PRESETS),
    }
    for key, node in _nodes(sections, ""):
        for name, (builder, presets) in kinds.items():
            spec = node.get(name)
            if not isinstance(spec, dict) or "class_path" in spec:
                continue
            where = f"{key}.{name}".lstrip(".")
            # dtype is the stage's own (base_dtype), never the spec's
            takes = [p for p in inspect.signature(builder).parameters if p != "dtype"]
            unknown = [k for k in spec if k not in takes]
            if unknown:
                close = difflib.get_close_matches(unknown[0], takes, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{where}: unknown key {unknown[0]!r} (it takes {', '.join(takes)}{hint})")
            if spec.get("path") is not None:
                sub = spec.get("subfolder", name)
                folder = Path(spec["path"]) / (sub or "")
                if not Path(spec["path"]).exists():
                    raise ConfigError(
                        f"{where}.path: {spec['path']} does not exist (a local diffusers-format checkpoint; "
                        "nothing is downloaded)"
                    )
                if not (folder / "config.json").is_file():
                    raise ConfigError(
                        f"{where}.path: no config.json in {folder} (a local diffusers-format checkpoint "
                        f"with a '{sub}' sub-folder)"
                    )
            elif spec.get("preset", "tiny") not in presets:
                raise _one_of(f"{where}.preset", spec.get("preset"), list(presets))


def check_presets(sections: dict[str, Any]) -> None:
    """Arguments that a class declares as preset names (``config_presets = {arg: names}``)."""
    for key, node in _nodes(sections, ""):
        presets = getattr(_class(node), "config_presets", None)
        if not presets:
            continue
        args = _args(node)
        for arg, names in presets.items():
            if arg in args and args[arg] not in names:
                raise _one_of(f"{key}.init_args.{arg}".lstrip("."), args[arg], list(names))


def check_masks(sections: dict[str, Any]) -> None:
    """The fused-attention mask terms of a grid coupling: known, and ones its layout has frames for;
    and its attention backend: known, and able to run that mask."""
    from fourdgen.nn.grid_coupling import GridCoupling

    for key, node in _nodes(sections, ""):
        cls = _class(node)
        if not (isinstance(cls, type) and issubclass(cls, GridCoupling)):
            continue
        mask = _args(node).get("mask")
        problem = None if mask is None else cls.mask_problem(mask)
        if problem:
            raise ConfigError(f"{key}.init_args.mask: {problem}".lstrip("."))
        problem = cls.backend_problem(mask, _args(node).get("backend", "auto"))
        if problem:
            raise ConfigError(f"{key}.init_args.backend: {problem}".lstrip("."))


def check_clip_frames(sections: dict[str, Any]) -> None:
    """Clip sizes a Wan stage's VAE takes: frames ``t k + 1`` (the data's ``num_frames`` and every
    ``clip_schedule`` length), height and width multiples of the VAE's spatial factor x the DiT's
    2 x 2 patch."""
    model, data = sections.get("model"), sections.get("data")
    cls = _class(model)
    if cls is None or not getattr(cls, "wan_vae", False):
        return
    vae = _args(model).get("vae") or {"preset": "tiny"}  # the stage's default
    factors = vae_factors(vae) if isinstance(vae, dict) else None
    if factors is None:
        return
    t, s = factors
    what = f"the VAE (model.init_args.vae: {json.dumps(vae)}) takes {t}k+1 frames (temporal factor {t})"
    lengths = []
    for where, args in (("model", _args(model)), ("data", _args(data) if isinstance(data, dict) else {})):
        if isinstance(args.get("num_frames"), int):
            lengths.append((f"{where}.init_args.num_frames", args["num_frames"]))
        schedule = args.get("clip_schedule")
        if isinstance(schedule, dict):
            lengths += [(f"{where}.init_args.clip_schedule.{k}", v) for k, v in schedule.items()]
    for key, T in lengths:
        if isinstance(T, int) and not isinstance(T, bool) and (T < 1 or (T - 1) % t):
            lo = max(1, (T - 1) // t * t + 1)
            raise ConfigError(f"{key}: {T}, but {what}: use {lo} or {lo + t}")
    data_args = _args(data) if isinstance(data, dict) else {}
    for key in ("height", "width"):
        v = data_args.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v % (2 * s):
            raise ConfigError(
                f"data.init_args.{key}: {v} is not a multiple of {2 * s} (the VAE's spatial factor {s} x the "
                f"DiT's 2 x 2 patch; model.init_args.vae: {json.dumps(vae)})"
            )


def check_fsdp_mesh(trainer: dict[str, Any] | None) -> None:
    """Lightning's ``ModelParallelStrategy`` builds a (data parallel x tensor parallel) mesh that must
    cover every process, and fourdgen shards with FSDP2 only (tensor parallel 1): so
    ``data_parallel_size`` is the number of processes. Lightning's ``auto`` sizes (the number of nodes
    x the GPUs per node) would make the tensor-parallel dimension the GPUs of a node instead."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = trainer or {}
    spec = trainer.get("strategy")
    if isinstance(spec, str) and "." in spec:  # a bare class path (no init_args) stays a string
        spec = {"class_path": spec}
    cls = _class(spec)
    if cls is None or not issubclass(cls, ModelParallelStrategy):
        return
    args, key = _args(spec), "trainer.strategy.init_args"
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    world = devices * nodes if isinstance(devices, int) and devices > 0 else None  # "auto", -1: not known
    tp, dp = args.get("tensor_parallel_size", "auto"), args.get("data_parallel_size", "auto")
    tp = (devices if world else None) if tp == "auto" else tp
    if tp not in (1, None):
        raise ConfigError(
            f"{key}.tensor_parallel_size: {args.get('tensor_parallel_size', 'auto')!r} (a tensor-parallel "
            f"size of {tp}); fourdgen shards with FSDP2 only: set it to 1 and data_parallel_size to "
            f"{world or 'the number of processes (trainer.devices x trainer.num_nodes)'}"
        )
    dp = nodes if dp == "auto" else dp
    if world is not None and dp != world:
        raise ConfigError(
            f"{key}.data_parallel_size: {args.get('data_parallel_size', 'auto')!r} (a data-parallel size of "
            f"{dp}), expected {world} (trainer.devices {devices} x trainer.num_nodes {nodes}): FSDP2 shards "
            "over every process"
        )


def check_config(cfg: dict[str, Any], subcommand: str | None = None) -> None:
    """All of the above on a parsed subcommand config (plain dicts): the first fault raises."""
    check_fsdp_mesh(cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else None)
    sections = {k: cfg.get(k) for k in ("model", "data") if isinstance(cfg.get(k), dict)}
    check_wan_specs(sections)
    check_presets(sections)
    check_masks(sections)
    check_weight_files(sections, subcommand)
    check_clip_frames(sections)
