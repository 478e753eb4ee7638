"""The pipeline file of ``fourdgen generate``: typed steps, named weights, ``${...}`` references.

A pipeline (``lightning_configs/pipelines/<name>.yaml``)::

    description: one image in, an RGB + XYZ video, cameras, depth, point clouds out
    input: [image]                    # input kinds it accepts: image, frames, video, scene
    weights:                          # name -> local path (``--weights name=PATH`` replaces one)
      video: outputs/4dnex/checkpoints/last.ckpt
    steps:
      - name: import                  # a built-in tool step (fourdgen/generate/tools.py)
        run: import
        args: {mode: still, size_from: video, fps: 16}
      - name: video                   # a LightningCLI step: the recipe + checkpoint + overrides
        run: predict
        config: ../video/4dnex.yaml   # relative to the pipeline file
        ckpt_path: ${weights.video}
        args:                         # CLI keys, as for ``fourdgen predict --<key>=<value>``
          data.init_args.root: ${steps.import}

References, substituted in every string of ``ckpt_path`` and ``args``: ``${steps.<name>}`` (the
folder of an earlier step's outputs), ``${weights.<name>}``, ``${out}`` (this step's own folder),
``${scene_id}`` (the imported scene's folder name) and ``${prompt}``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentParser

from fourdgen.entry import condense_parse_error
from fourdgen.errors import ConfigError

TOOL_STEPS = ("import", "depth", "cameras")
LIGHTNING_STEPS = ("predict", "fit")
INPUT_KINDS = ("image", "frames", "video", "scene")
_REF = re.compile(r"\$\{([^}]*)\}")


@dataclass
class Step:
    """One step. ``run``: a tool (``import``, ``depth``, ``cameras``) or a LightningCLI subcommand
    (``predict``, ``fit``) of ``config`` (a recipe) with ``ckpt_path``; ``args``: the tool's options,
    or the CLI's ``--key=value`` overrides."""

    name: str
    run: Literal["import", "depth", "cameras", "predict", "fit"]
    config: str | None = None
    ckpt_path: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def is_lightning(self) -> bool:
        return self.run in LIGHTNING_STEPS


@dataclass
class Pipeline:
    """A parsed pipeline file; ``config`` paths are resolved against its folder."""

    path: Path
    steps: list[Step]
    input: list[str]
    weights: dict[str, str | None]
    description: str = ""

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise ConfigError(f"{self.path}: no step named {name!r} (steps: {[s.name for s in self.steps]})")


def _parser(**arguments: Any) -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    for key, (kind, default) in arguments.items():
        if default is ...:
            parser.add_argument(f"--{key}", type=kind, required=True)
        else:
            parser.add_argument(f"--{key}", type=kind, default=default)
    return parser


def load_pipeline(
    path: str | Path, weights: dict[str, str] | None = None, sets: list[str] | None = None
) -> Pipeline:
    """Read and check a pipeline file; ``weights`` replace entries of its ``weights`` (unknown names
    are refused); ``sets`` (``<step>.<key>=<value>``, the value read as YAML) add or replace one of
    a step's ``args``. Raises one :class:`ConfigError` naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--pipeline: {path} is not a file (e.g. lightning_configs/pipelines/image_to_4d.yaml)"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with 'steps', got {type(raw).__name__}")
    top = _parser(
        steps=(list[dict[str, Any]], ...),
        input=(list[Literal["image", "frames", "video", "scene"]], list(INPUT_KINDS)),
        weights=(dict[str, str | None], {}),
        description=(str, ""),
    )
    try:
        cfg = top.parse_object(copy.deepcopy(raw))  # jsonargparse turns nested dicts into Namespaces
    except Exception as e:
        raise ConfigError(f"{path}: {condense_parse_error(str(e))}") from None
    step_parser = _parser(
        name=(str, ...),
        run=(Literal["import", "depth", "cameras", "predict", "fit"], ...),
        config=(str | None, None),
        ckpt_path=(str | None, None),
        args=(dict[str, Any], {}),
    )
    steps: list[Step] = []
    for i in range(len(cfg.steps)):
        try:
            step = Step(**vars(step_parser.parse_object(copy.deepcopy(raw["steps"][i]))))
            step.args = dict(raw["steps"][i].get("args") or {})  # as written, plain dicts
        except Exception as e:
            raise ConfigError(f"{path}: steps[{i}]: {condense_parse_error(str(e))}") from None
        where = f"{path}: steps[{i}] ({step.name!r})"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", step.name):
            raise ConfigError(f"{where}: name must be letters, digits, '_' or '-' (it names a folder)")
        if any(p.name == step.name for p in steps):
            raise ConfigError(f"{where}: another step has the same name")
        if step.is_lightning:
            if not step.config:
                raise ConfigError(f"{where}: run {step.run} needs 'config' (a recipe)")
            step.config = str((path.parent / step.config).resolve())
        elif step.config or step.ckpt_path:
            raise ConfigError(f"{where}: 'config'/'ckpt_path' only apply to predict/fit steps")
        steps.append(step)
    for item in sets or []:
        target, sep, value = item.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise ConfigError(
                f"--set {item!r}: expected <step>.<key>=<value>, e.g. video.model.init_args.sample_steps=10"
            )
        step = next((s for s in steps if s.name == name), None)
        if step is None:
            raise ConfigError(
                f"--set {item!r}: {path} has no step {name!r} (steps: {[s.name for s in steps]})"
            )
        try:
            step.args[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    merged = dict(cfg.weights)
    for name, value in (weights or {}).items():
        if name not in merged:
            raise ConfigError(f"--weights {name}=...: {path} names no such weights (it has {sorted(merged)})")
        merged[name] = value
    return Pipeline(
        path=path, steps=steps, input=list(cfg.input), weights=merged, description=cfg.description
    )


def substitute(value: Any, refs: dict[str, str], where: str) -> Any:
    """``value`` with every ``${name}`` in its strings replaced from ``refs`` (recursively through
    lists and dicts). A string that is exactly one reference to an unset weight becomes None."""
    if isinstance(value, dict):
        return {k: substitute(v, refs, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, refs, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        key = m.group(1).strip()
        if key not in refs:
            known = ", ".join(sorted(refs))
            raise ConfigError(f"{where}: unknown reference ${{{key}}} (known here: {known})")
        if refs[key] is None:
            name = key.removeprefix("weights.")
            raise ConfigError(f"{where}: ${{{key}}} is not set: pass --weights {name}=PATH (a local file)")
        return str(refs[key])

    return _REF.sub(one, value)


def references(value: Any) -> set[str]:
    """The names ``value`` refers to with ``${...}`` (recursively)."""
    if isinstance(value, dict):
        return set().union(*(references(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(references(v) for v in value)) if value else set()
    return {m.strip() for m in _REF.findall(value)} if isinstance(value, str) else set()
