"""``fourdgen`` command line: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.
(``generate``, which chains them, is dispatched above this module by :mod:`fourdgen.main`.)

Models and DataModules are chosen by ``class_path`` (subclass mode), so a user's own
``LightningDataModule`` from their own package plugs in without touching fourdgen::

    fourdgen fit --config lightning_configs/quickstart.yaml
    fourdgen fit --config recipe.yaml --data.class_path my_pkg.MyDataModule --data.init_args.root /data
    fourdgen fit --config recipe.yaml --print_config

Errors that are the user's to fix (fourdgen's own, config-parse errors) print as one line and exit 1;
``--debug`` or ``FOURDGEN_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import Namespace
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from fourdgen.callbacks.guard import GuardedOutput
from fourdgen.callbacks.progress import FinalMetrics, LineProgress, StepProgressBar
from fourdgen.checkpoints import (
    META_FILE,
    ConsolidatingCheckpointIO,
    checkpoint_metadata,
    is_sharded_checkpoint,
)
from fourdgen.config_checks import check_config
from fourdgen.entry import condense_parse_error, env_flag
from fourdgen.errors import ConfigError
from fourdgen.io import check_checkpoint_file

# GPU recipe -> its tiny CPU twin, both relative to lightning_configs/.
TINY_TWINS: dict[str, tuple[str, ...]] = {
    "fit/full4d.yaml": ("quickstart.yaml", "tiny/fit.yaml", "tiny/fit_fmd.yaml"),
    "video/4dnex.yaml": ("tiny/video.yaml",),
    "video/one4d.yaml": ("tiny/one4d.yaml",),
    "video/4real_v2.yaml": ("tiny/4real_v2.yaml",),
    "video/full4d.yaml": ("tiny/full4d.yaml",),
    "recon/4real_v2_static.yaml": ("tiny/recon_static.yaml",),
    "recon/4real_v2_dynamic.yaml": ("tiny/recon_dynamic.yaml",),
}

# What LightningCLI/Lightning write into a version dir at set-up, before the run produced anything.
_SETUP_FILES = {"config.yaml", "hparams.yaml"}
_SETUP_TAGS = ("hp_metric", "_hparams_/")


def _dotted_args(argv: list[Any] | dict[str, Any], root: str) -> dict[str, Any]:
    """The ``--<root>.a.b=value`` (or ``--<root>.a.b value``) arguments of ``argv`` as a nested dict
    ``{"a": {"b": value}}``, values read as YAML (as jsonargparse reads them)."""
    import yaml

    if not isinstance(argv, list):
        return {}
    out: dict[str, Any] = {}
    prefix = f"--{root}."
    for i, arg in enumerate(argv):
        if not isinstance(arg, str) or not arg.startswith(prefix):
            continue
        key, sep, value = arg[len(prefix) :].partition("=")
        if not sep:
            if i + 1 >= len(argv):
                continue
            value = argv[i + 1]
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        else:
            node[last] = parsed
    return out


class FourDGenArgumentParser(LightningArgumentParser):
    """Parse errors as one line (``fourdgen: error: <what, naming the key>``) and exit 1: the usage dump
    of every option buried the message. ``--help`` still prints the full usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or env_flag("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # raises: nested parsers rely on it, and --debug wants the traceback
        sys.stderr.write(f"fourdgen: error: {condense_parse_error(message)}\n")
        sys.stderr.write("(run with --help for the accepted options, --debug for the full message)\n")
        self.exit(1)


def _name(value: Any) -> str:
    """An accelerator/strategy config value (string, class_path Namespace or instance) as a lowercase name."""
    if isinstance(value, Namespace | dict):
        value = value.get("class_path", "")
    elif value is not None and not isinstance(value, str | int | list):
        value = type(value).__name__
    return str(value).lower()


def needs_gpu(trainer_cfg: Namespace | dict[str, Any]) -> bool:
    """Whether the trainer config only runs with a GPU: accelerator gpu/cuda, a GPU-only strategy, or
    GPU indices as devices (with the accelerator left to auto)."""
    accelerator, strategy = _name(trainer_cfg.get("accelerator")), _name(trainer_cfg.get("strategy"))
    if "cpu" in accelerator:
        return False
    if accelerator in ("gpu", "cuda") or "cuda" in accelerator:
        return True
    if any(s in strategy for s in ("fsdp", "deepspeed", "modelparallel", "model_parallel")):
        return True
    devices = trainer_cfg.get("devices")
    return isinstance(devices, list) or (isinstance(devices, str) and "," in devices)


def _gpu_available(trainer_cfg: Namespace | dict[str, Any]) -> bool:
    # Lightning maps accelerator "gpu" to Apple's MPS too; anything else here needs CUDA.
    mps = _name(trainer_cfg.get("accelerator")) == "gpu" and torch.backends.mps.is_available()
    return torch.cuda.is_available() or mps


def _recipe_key(config_paths: list[Any] | None) -> str | None:
    """The last ``--config`` that is one of the GPU recipes in :data:`TINY_TWINS`, as its key."""
    for p in reversed(config_paths or []):
        key = "/".join(Path(os.fspath(p)).parts[-2:])
        if key in TINY_TWINS:
            return key
    return None


def checkpoint_step(path: str | os.PathLike[str] | None) -> int | None:
    """``global_step`` of a Lightning checkpoint file or sharded folder (its ``meta.pt``); None for
    "last"/"best", a remote path or anything unreadable: the caller then just runs."""
    try:
        if path is None or not (Path(path).is_file() or is_sharded_checkpoint(path)):
            return None
        return int(checkpoint_metadata(path)["global_step"])
    except Exception:
        return None


def _event_file_has_data(path: Path) -> bool:
    """Whether a TensorBoard event file holds anything but the header and the hparams written at set-up."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    try:
        for event in EventFileLoader(str(path)).Load():
            if any(not v.tag.startswith(_SETUP_TAGS) for v in event.summary.value):
                return True
            if event.HasField("graph_def") or event.HasField("tagged_run_metadata"):
                return True
    except Exception:
        return True  # unreadable: not ours to judge
    return False


def only_setup_files(d: Path) -> bool:
    """Whether ``d`` holds nothing but the files LightningCLI/Lightning write before a run does anything."""
    if not d.is_dir():
        return False
    for f in d.rglob("*"):
        if f.is_dir() or f.name in _SETUP_FILES:
            continue
        if f.name.startswith("events.out.tfevents.") and not _event_file_has_data(f):
            continue
        return False
    return True


@rank_zero_only
def _print0(*args: Any) -> None:
    print(*args, flush=True)


class FourDGenCLI(LightningCLI):
    """LightningCLI with fourdgen's defaults: no abbreviated options, one-line parse errors, ``--overwrite``,
    GPU recipes refused early on CPU machines, a progress bar that works in log files, no empty
    ``lightning_logs/version_N`` dirs from failed or finished runs."""

    def __init__(self, args: list[str] | dict[str, Any] | None = None, run: bool = True, **kwargs: Any):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # re-runs in one dir (Lightning#17115)
        kwargs.setdefault("parser_class", FourDGenArgumentParser)
        # argparse takes --trainer.max_step for --trainer.max_steps (and any unique prefix): a typo must fail.
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("allow_abbrev", False)
        for sub in self.subcommands():
            parser_kwargs[sub] = {"allow_abbrev": False, **(parser_kwargs.get(sub) or {})}
        self._resume_step: int | None = None
        self._model_args = _dotted_args(sys.argv[1:] if args is None else args, "model")
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            parser_kwargs=parser_kwargs,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The DataModule caches latents with the model's VAE, conditioning and pointmap normalisation:
        # one setting for both.
        # A model or DataModule without these arguments is left alone.
        for name in ("vae", "conditioning", "pointmap_norm"):
            parser.link_arguments(f"model.init_args.{name}", f"data.init_args.{name}", apply_on="parse")
        parser.add_argument(
            "--overwrite",
            type=bool,
            nargs="?",
            const=True,  # bare --overwrite means true
            default=False,
            help="Let output-writing callbacks replace existing outputs (files fourdgen did not write, or a "
            "longer run's outputs).",
        )
        parser.add_argument(
            "--num_threads",
            type=int | None,
            default=None,
            help="torch intra-op CPU threads (default: torch's). Small CPU jobs run best on 1: with more, "
            "OpenMP's spinning threads fight any other busy process for the cores.",
        )

    # -- before anything is built ---------------------------------------------------------------------

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # Checked right after parsing: before seeding, before any class is built.
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        cfg = self.config[subcommand] if subcommand else self.config
        self._check_gpu(cfg)
        if subcommand == "fit":
            self._resume_step = self._exit_if_finished(cfg)

    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path``, Lightning re-parses the model from the checkpoint's hyper-parameters over
        the config; options given as ``--model.<key>=<value>`` arguments still win over both (e.g. fewer
        sampling steps at predict), as they would without a checkpoint."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in ("last", "best", "hpc", "registry") and "://" not in str(ckpt):
            check_checkpoint_file(ckpt)  # a truncated file: one line naming it, not torch's zip error
        if ckpt and is_sharded_checkpoint(ckpt):
            # Lightning reads the hyper-parameters of checkpoint files only; a folder's are in its meta.pt,
            # a torch.save'd dict of the same form: read them the same way.
            self.config[sub].ckpt_path = os.path.join(ckpt, META_FILE)
            try:
                super()._parse_ckpt_path()
            finally:
                self.config[sub].ckpt_path = ckpt
        else:
            super()._parse_ckpt_path()
        if sub and self._model_args and self.config[sub].get("ckpt_path"):
            given = {"class_path": self.config[sub].model.class_path, **self._model_args}
            self.config = self.parser.parse_object({sub: {"model": given}}, self.config)

    @staticmethod
    def _check_gpu(cfg: Namespace) -> None:
        """A GPU recipe on a CPU machine: say so and name its tiny CPU twin, before building any model
        (Lightning would only say "No supported gpu backend found!")."""
        trainer_cfg = cfg.get("trainer") or {}
        if not needs_gpu(trainer_cfg) or _gpu_available(trainer_cfg):
            return
        key = _recipe_key(cfg.get("config"))
        what = f"lightning_configs/{key}" if key else "this config"
        if key:
            twins = " or ".join(f"lightning_configs/{t}" for t in TINY_TWINS[key])
            fix = f"its tiny CPU twin is {twins}"
        else:
            fix = "use a recipe under lightning_configs/tiny/ or pass --trainer.accelerator cpu"
        raise ConfigError(
            f"{what} needs a CUDA GPU (trainer.accelerator {_name(trainer_cfg.get('accelerator'))}, strategy "
            f"{_name(trainer_cfg.get('strategy'))}) but torch.cuda.is_available() is False; {fix}"
        )

    @staticmethod
    def _exit_if_finished(cfg: Namespace) -> int | None:
        """Resuming a checkpoint that already reached ``max_steps`` would only make an empty version dir:
        stop here with exit 0. Returns the checkpoint's step (None without one, or when unreadable)."""
        ckpt_path, max_steps = cfg.get("ckpt_path"), cfg.trainer.get("max_steps") or -1
        step = checkpoint_step(ckpt_path)
        if step is not None and 0 < max_steps <= step:
            _print0(
                f"fourdgen: {ckpt_path} already finished at step {step} (trainer.max_steps {max_steps}); "
                "nothing to train. Raise --trainer.max_steps to continue."
            )
            raise SystemExit(0)
        return step

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Adds the final-metrics line and fourdgen's progress bar (lines without a TTY, step totals with
        one) unless the config disabled the bar or brought its own."""
        if "callbacks" in kwargs:  # a subclass chose the callbacks itself
            return super().instantiate_trainer(**kwargs)
        cfg = self._get(self.config_init, "trainer", default={})
        given, defaults = cfg.get("callbacks"), self.trainer_defaults.get("callbacks")
        callbacks = [] if given is None else list(given) if isinstance(given, list) else [given]
        theirs = [*callbacks, *(defaults if isinstance(defaults, list) else [defaults])]
        callbacks.append(FinalMetrics())
        if cfg.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in theirs
        ):
            isatty = getattr(sys.stdout, "isatty", None)
            callbacks.append(StepProgressBar() if isatty and isatty() else LineProgress())
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        # After the checkpoint's hyper-parameters are merged, before any class is built: weights that
        # are not there, unknown presets, mask terms and clip sizes fail here, naming the key.
        check_config(cfg.as_dict(), self.subcommand)
        threads = cfg.get("num_threads")
        if threads:
            torch.set_num_threads(threads)

    def after_instantiate_classes(self) -> None:
        # A sharded checkpoint (ModelParallelStrategy's folder) also resumes under a strategy that does
        # not shard (one process, DDP): consolidated in memory. A user's own CheckpointIO is left alone.
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = ConsolidatingCheckpointIO()
        # --overwrite reaches every output-writing callback, and nothing else sets it.
        if (self.config_init[self.subcommand] if self.subcommand else self.config_init).get("overwrite"):
            for cb in self.trainer.callbacks:
                if isinstance(cb, GuardedOutput):
                    cb.overwrite = True

    # -- running ----------------------------------------------------------------------------------------

    def _run_subcommand(self, subcommand: str) -> None:
        before = self._log_roots()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._remove_setup_only_log_dirs(before)
            raise
        if subcommand == "fit" and self.trainer.global_step <= (self._resume_step or 0):
            self._remove_setup_only_log_dirs(before)  # took no step: the version dir is empty

    def before_predict(self) -> None:
        """Predicting with random weights makes noise that looks like a bug: stop, say which weights to
        load. Models opt in by ``weights_source() -> str | None`` (None: nothing trained was loaded)."""
        if self.config_init["predict"].get("ckpt_path"):
            return
        source = getattr(self.model, "weights_source", None)
        if callable(source) and source() is None:
            raise ConfigError(
                f"predict: {type(self.model).__name__} has no trained weights (weights_source() is None); "
                f"pass --ckpt_path {self._last_checkpoint() or '<run dir>/checkpoints/last.ckpt'} "
                "(or the recipe's init/lora weights option)"
            )

    def _last_checkpoint(self) -> str | None:
        """The newest ``last.ckpt`` of a run under ``default_root_dir``, for the predict hint."""
        root = Path(self.trainer.default_root_dir)
        found = [*root.glob("lightning_logs/*/checkpoints/last.ckpt"), *root.glob("checkpoints/last.ckpt")]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None

    # -- no empty version dirs ------------------------------------------------------------------------------

    def _log_roots(self) -> dict[Path, set[str] | None]:
        """For each local logger with version dirs: its root and the names in it now (None: no root yet)."""
        roots: dict[Path, set[str] | None] = {}
        for logger in self.trainer.loggers:
            root = getattr(logger, "root_dir", None)
            if root and "://" not in str(root):
                roots[Path(root)] = set(os.listdir(root)) if os.path.isdir(root) else None
        return roots

    def _remove_setup_only_log_dirs(self, before: dict[Path, set[str] | None]) -> None:
        """Remove the version dirs this run created if they hold only set-up files, never one that existed."""
        if not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            root = Path(getattr(logger, "root_dir", None) or "")
            if root not in before:
                continue
            try:
                log_dir = Path(logger.log_dir)
            except Exception:
                continue
            existed = before[root] or set()
            if log_dir.parent == root and log_dir.name not in existed and only_setup_files(log_dir):
                shutil.rmtree(log_dir, ignore_errors=True)
                if before[root] is None and root.is_dir() and not any(root.iterdir()):
                    root.rmdir()  # lightning_logs/ itself was made by this run and is empty now
