"""Lightning steps of ``fourdgen generate``: ``fourdgen predict|fit`` of a recipe, in this process,
through the same :class:`~fourdgen.cli.FourDGenCLI` as the command line.

A step's ``args`` become ``--key=value`` arguments after ``--config <recipe>``: strings as they are,
anything else as JSON (which jsonargparse reads). :func:`resolve` parses them without building
anything, so the pipeline is checked (types, class paths, GPU needs, weight files) before any
step runs; :func:`run` runs the step.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from fourdgen.cli import FourDGenCLI
from fourdgen.config_checks import UNUSED_WHEN, WEIGHT_KEYS, weight_paths  # noqa: F401 (this module's API)
from fourdgen.entry import condense_parse_error, is_own_error
from fourdgen.errors import ConfigError, FourDGenError


def cli_args(run: str, config: str, ckpt_path: str | None, args: dict[str, Any], logs: Path) -> list[str]:
    """The ``fourdgen <run>`` arguments of a step; Lightning's own files (the saved config, logs)
    go to ``logs`` (the trainer's ``default_root_dir``), not among the step's outputs, whose
    writers claim only folders they wrote."""
    argv = [run, f"--config={config}", f"--trainer.default_root_dir={logs}"]
    if ckpt_path:
        argv.append(f"--ckpt_path={ckpt_path}")
    for key, value in args.items():
        argv.append(f"--{key}={value if isinstance(value, str) else json.dumps(value)}")
    return argv


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    """``sys.argv`` is the step's own command while it runs: what LightningCLI expects, and what a
    multi-process launcher would start on the other ranks (``fourdgen <run> ...``, not generate)."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "fourdgen", *argv]
    try:
        yield
    finally:
        sys.argv = saved


class _Parsed(Exception):
    def __init__(self, cli: FourDGenCLI):
        self.cli = cli


class _ParseOnly(FourDGenCLI):
    """Parses (and checks) the arguments, then stops before any class is built."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self)


def resolve(argv: list[str], where: str) -> Namespace:
    """The parsed config of ``fourdgen <argv>`` (the subcommand's Namespace). Raises one
    :class:`ConfigError` prefixed by ``where`` (the step) for anything the parser refuses."""
    no_exit = {"exit_on_error": False}
    try:
        with _argv(argv):
            _ParseOnly(args=None, parser_kwargs={**no_exit, argv[0]: no_exit})
    except _Parsed as done:
        return done.cli.config[argv[0]]
    except FourDGenError as e:
        raise ConfigError(f"{where}: {e}") from None
    except SystemExit as e:  # e.g. a recipe that is already finished (fit)
        raise ConfigError(f"{where}: the step would exit at once ({e})") from None
    except Exception as e:  # jsonargparse's ArgumentError: a bad key or value
        raise ConfigError(f"{where}: {condense_parse_error(str(e))}") from None
    raise AssertionError("unreachable: the CLI returned without parsing")


def as_dict(ns: Any) -> Any:
    """A parsed config as plain dicts and lists (for ``generate.json``)."""
    if isinstance(ns, Namespace):
        return {k: as_dict(v) for k, v in vars(ns).items() if not k.startswith("__")}
    if isinstance(ns, dict):
        return {k: as_dict(v) for k, v in ns.items()}
    if isinstance(ns, list | tuple):
        return [as_dict(v) for v in ns]
    if isinstance(ns, str | int | float | bool) or ns is None:
        return ns
    return str(ns)


def data_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """The resolved ``data.init_args`` of a step (``{}`` when it has none)."""
    data = cfg.get("data") or {}
    return dict(data.get("init_args") or {}) if isinstance(data, dict) else {}


def run(argv: list[str], where: str) -> FourDGenCLI:
    """Run ``fourdgen <argv>`` in this process. fourdgen's own errors gain the step's name."""
    try:
        with _argv(argv):
            return FourDGenCLI(args=None)  # reads sys.argv, the step's command
    except Exception as e:
        if is_own_error(e) and e.args and isinstance(e.args[0], str):
            e.args = (f"{where}: {e.args[0]}", *e.args[1:])  # the same error, naming the step
        raise
