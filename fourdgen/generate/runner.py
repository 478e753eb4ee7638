"""Runs a pipeline: checks everything first, then each step into its own folder, atomically, with
``generate.json`` recording what ran and ``--resume`` skipping what is done.

Layout of ``--out``::

    generate.json          steps, status, times, input checksums, resolved configs (see below)
    <step name>/           one folder per step, renamed into place when the step succeeded
    .<step name>.partial/  the step in flight (removed when it is rerun)
    logs/<step name>/      Lightning's files of a predict/fit step (its config.yaml, TensorBoard logs)

A step is skipped on ``--resume`` when ``generate.json`` says it finished with the same
fingerprint: a hash of its resolved arguments and config, the recipe file, the weights it names
(path, size, modification time), the input files' checksums (SHA-256) and every earlier step's
output digest. A changed input, option or weight therefore reruns that step and the ones after it;
an interrupted run loses only the step in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser

from fourdgen.entry import condense_parse_error
from fourdgen.errors import ConfigError, OutputExistsError
from fourdgen.generate import checks, stages
from fourdgen.generate.media import Probe, probe
from fourdgen.generate.progress import sampling_bar
from fourdgen.generate.spec import Pipeline, Step, load_pipeline, references, substitute
from fourdgen.generate.tools import TOOLS, ToolContext
from fourdgen.io import write_json

STATE = "generate.json"
FORMAT = "fourdgen-generate"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def input_checksums(p: Probe) -> dict[str, str]:
    """SHA-256 of every file of an input (a scene: of every file under its folder)."""
    files = [p.path] if p.path.is_file() else sorted(f for f in p.path.rglob("*") if f.is_file())
    return {str(f.relative_to(p.path) if p.path.is_dir() else f.name): sha256(f) for f in files}


def folder_digest(folder: Path) -> str:
    """Digest of a step's outputs: every file's relative path, size and modification time (links
    followed): cheap for large outputs, and changed by any rewrite."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            f = Path(root) / name
            st = f.stat()
            h.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _identity(path: str) -> list[Any]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return [
            str(p.resolve()),
            [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        ]
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Planned:
    """A step with its references substituted: ``args`` (tool options or CLI overrides), ``argv``
    and the resolved ``config`` (Lightning steps), ``tool`` (tool steps), ``weights`` it reads."""

    step: Step
    index: int
    args: dict[str, Any]
    argv: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    tool: Any = None
    weights: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        s = self.step
        what = f"{s.run} {Path(s.config).name}" if s.is_lightning else s.run
        return f"step {self.index + 1} {s.name!r} ({what})"


class Run:
    """One ``fourdgen generate`` run into ``out``."""

    def __init__(
        self,
        pipeline: str | Path,
        inputs: list[str],
        out: str | Path,
        resume: bool = False,
        prompt: str = "",
        weights: dict[str, str] | None = None,
        sets: list[str] | None = None,
    ):
        self.pipe: Pipeline = load_pipeline(pipeline, weights, sets)
        if not inputs:
            raise ConfigError("--input: give an image, a folder of frames, a video or a scene folder")
        self.inputs = [probe(p) for p in inputs]
        for p in self.inputs:
            if p.kind not in self.pipe.input:
                raise ConfigError(
                    f"--input {p.path}: {self.pipe.path.name} takes {' or '.join(self.pipe.input)} inputs, "
                    f"this is {'an' if p.kind[0] in 'aeiou' else 'a'} {p.kind}"
                )
        self.out, self.resume, self.prompt = Path(out), resume, prompt
        stem = self.inputs[0].path.stem if self.inputs[0].path.is_file() else self.inputs[0].path.name
        self.scene_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "input"
        self.state = self._open_state()
        self.plans = self._plan()

    # ------------------------------------------------------------------------------ state
    def _open_state(self) -> dict[str, Any]:
        path = self.out / STATE
        if path.is_file():
            if not self.resume:
                raise OutputExistsError(
                    f"--out {self.out}: holds a fourdgen generate run; pass --resume to continue it "
                    "(finished steps whose inputs are unchanged are kept) or choose another --out"
                )
            try:
                state = json.loads(path.read_text())
            except ValueError as e:
                raise ConfigError(f"{path}: unreadable ({e}); remove it to start over") from None
            if state.get("format") != FORMAT:
                raise ConfigError(f"{path}: not a fourdgen generate record (format {state.get('format')!r})")
            return state
        if self.out.exists() and any(self.out.iterdir()):
            raise OutputExistsError(
                f"--out {self.out}: holds files fourdgen generate did not write; choose another "
                "(or an empty) folder"
            )
        return {"format": FORMAT, "version": 1, "created": _now(), "steps": {}}

    def _save(self) -> None:
        self.state["updated"] = _now()
        write_json(self.out / STATE, self.state)

    # ------------------------------------------------------------------------------- checks
    def _refs(self, step: Step, out: Path) -> dict[str, str | None]:
        refs: dict[str, str | None] = {f"weights.{k}": v for k, v in self.pipe.weights.items()}
        refs.update({f"steps.{s.name}": str(self.step_dir(s.name)) for s in self.pipe.steps})
        refs.update(out=str(out), scene_id=self.scene_id, prompt=self.prompt)
        return refs

    def step_dir(self, name: str) -> Path:
        return (self.out / name).absolute()

    def logs(self, name: str) -> Path:
        """Lightning's own files of a step (saved config, logs): ``<out>/logs/<step>``."""
        return (self.out / "logs" / name).absolute()

    def _partial(self, name: str) -> Path:
        return (self.out / f".{name}.partial").absolute()

    def _plan(self) -> list[Planned]:
        """Substitute references, resolve every Lightning step's config and check it, then check the
        tools against those configs: all before anything runs."""
        plans: list[Planned] = []
        for i, step in enumerate(self.pipe.steps):
            out = self.step_dir(step.name)
            refs = self._refs(step, out)
            where = f"{self.pipe.path}: steps[{i}] ({step.name!r})"
            later = {f"steps.{s.name}" for s in self.pipe.steps[i:]}
            used = {r for r in _refs_in(step) if r in later}
            if used:
                raise ConfigError(
                    f"{where}: refers to ${{{sorted(used)[0]}}}, a step that runs later (or itself)"
                )
            plan = Planned(step, i, substitute(step.args, refs, f"{where}.args"))
            if step.is_lightning:
                ckpt = substitute(step.ckpt_path, refs, f"{where}.ckpt_path")
                if ckpt and not Path(ckpt).is_file():
                    raise ConfigError(
                        f"{plan.where}: ckpt_path {ckpt} is not a file (a Lightning checkpoint)"
                    )
                if not Path(step.config).is_file():
                    raise ConfigError(f"{where}: config {step.config} is not a file (a recipe)")
                plan.argv = stages.cli_args(step.run, step.config, ckpt, plan.args, self.logs(step.name))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    plan.config = stages.as_dict(stages.resolve(plan.argv, plan.where))
                checks.check_weights(plan.config, plan.where, step.name)
                checks.check_clip_size(plan.config, plan.where)
                plan.weights = [p for _, p in stages.weight_paths(plan.config)]
            plans.append(plan)
        data = {p.step.name: stages.data_args(p.config) for p in plans if p.step.is_lightning}
        self._check_grid_sizes(plans, data)
        for plan in plans:
            if plan.step.is_lightning:
                continue
            parser = ArgumentParser(exit_on_error=False)
            parser.add_class_arguments(TOOLS[plan.step.run])
            try:
                options = vars(parser.parse_object(plan.args))
            except Exception as e:
                raise ConfigError(f"{plan.where}: args: {condense_parse_error(str(e))}") from None
            plan.tool = TOOLS[plan.step.run](**options)
            try:
                plan.tool.check(self._context(plan, data))
            except ConfigError as e:
                raise ConfigError(f"{plan.where}: {e}") from None
            plan.weights = [v for k, v in options.items() if k == "model" and v]
            plan.config = options
        self.data = data
        return plans

    def _check_grid_sizes(self, plans: list[Planned], data: dict[str, dict[str, Any]]) -> None:
        """A Lightning step that reads an earlier Lightning step's grid asks for no more views and
        frames than that step writes (its ``data.init_args.num_views`` / ``num_frames``)."""
        for plan in plans:
            if not plan.step.is_lightning:
                continue
            for ref in sorted(_refs_in(plan.step)):
                src = ref.removeprefix("steps.")
                if src == ref or src not in data:
                    continue
                for key, default in (("num_views", 1), ("num_frames", None)):
                    want, have = data[plan.step.name].get(key), data[src].get(key, default)
                    if isinstance(want, int) and isinstance(have, int) and want > have:
                        raise ConfigError(
                            f"{plan.where}: data.init_args.{key} = {want}, but step {src!r} writes {have}: "
                            f"set it to {have} or null (all)"
                        )

    def _context(self, plan: Planned, data: dict[str, dict[str, Any]]) -> ToolContext:
        names = [s.name for s in self.pipe.steps[: plan.index]]
        return ToolContext(
            out=self._partial(plan.step.name),
            inputs=self.inputs,
            scene_id=self.scene_id,
            prompt=self.prompt,
            steps={n: self.step_dir(n) for n in names},
            data=data,
        )

    # -------------------------------------------------------------------------------- running
    def _fingerprint(self, plan: Planned, upstream: list[str]) -> str:
        parts: dict[str, Any] = {
            "run": plan.step.run,
            "args": plan.args,
            "config": plan.config,
            "weights": [_identity(w) for w in plan.weights],
            "upstream": upstream,
        }
        if plan.step.is_lightning:
            parts["recipe"] = sha256(Path(plan.step.config))
        if plan.step.run == "import":
            parts["inputs"] = self.state.get("inputs")
            parts["prompt"] = self.prompt
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def run(self) -> dict[str, Any]:
        """Run (or skip) every step in order; returns the ``generate.json`` record."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.state.update(
            pipeline=str(self.pipe.path.resolve()),
            pipeline_sha256=sha256(self.pipe.path),
            inputs=[
                {"path": str(p.path.resolve()), "kind": p.kind, "sha256": input_checksums(p)}
                for p in self.inputs
            ],
            prompt=self.prompt,
            scene_id=self.scene_id,
            weights=self.pipe.weights,
            order=[s.name for s in self.pipe.steps],
        )
        self._save()
        n, upstream, t_all = len(self.plans), [], time.monotonic()
        for plan in self.plans:
            name = plan.step.name
            fp = self._fingerprint(plan, upstream)
            rec = self.state["steps"].get(name, {})
            final = self.step_dir(name)
            done = rec.get("status") == "done" and rec.get("fingerprint") == fp and final.is_dir()
            if done and folder_digest(final) == rec.get("output_digest"):
                print(
                    f"fourdgen generate: [{plan.index + 1}/{n}] {name}: "
                    "done before, inputs unchanged (skipped)"
                )
                rec["skipped"] = rec.get("skipped", 0) + 1
                upstream.append(rec["output_digest"])
                self._save()
                continue
            what = (
                f"{plan.step.run} {Path(plan.step.config).name}" if plan.step.is_lightning else plan.step.run
            )
            print(f"fourdgen generate: [{plan.index + 1}/{n}] {name}: {what} ...", flush=True)
            rec = self.state["steps"][name] = {
                "run": plan.step.run,
                "status": "running",
                "started": _now(),
                "fingerprint": fp,
                "folder": name,
                **({"recipe": plan.step.config, "argv": plan.argv} if plan.step.is_lightning else {}),
            }
            self._save()
            t0 = time.monotonic()
            if torch.cuda.is_available():  # steps run in this process: their peaks are separable
                torch.cuda.reset_peak_memory_stats()
            partial = self._partial(name)
            shutil.rmtree(partial, ignore_errors=True)
            try:
                rec.update(self._execute(plan, partial))
            except BaseException as e:
                rec.update(
                    status="failed", error=f"{type(e).__name__}: {e}", seconds=round(time.monotonic() - t0, 2)
                )
                self._save()
                raise
            self._commit(partial, final)
            rec.update(status="done", finished=_now(), seconds=round(time.monotonic() - t0, 2))
            if torch.cuda.is_available():
                rec["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rec["output_digest"] = folder_digest(final)
            upstream.append(rec["output_digest"])
            self._save()
            print(
                f"fourdgen generate: [{plan.index + 1}/{n}] {name}: done in {rec['seconds']:.1f}s -> {final}"
            )
        total = time.monotonic() - t_all
        self.state["seconds"] = round(total, 2)
        self._save()
        print(f"fourdgen generate: all {n} steps done in {total:.1f}s; outputs in {self.out.resolve()}")
        return self.state

    def _execute(self, plan: Planned, partial: Path) -> dict[str, Any]:
        if not plan.step.is_lightning:
            partial.mkdir(parents=True)
            return {"options": plan.config, "record": plan.tool.run(self._context(plan, self.data))}
        refs = self._refs(plan.step, partial)
        args = substitute(plan.step.args, refs, plan.where)
        ckpt = substitute(plan.step.ckpt_path, refs, plan.where)
        shutil.rmtree(self.logs(plan.step.name), ignore_errors=True)
        argv = stages.cli_args(plan.step.run, plan.step.config, ckpt, args, self.logs(plan.step.name))
        with sampling_bar(f"{plan.step.name} sampling"), warnings.catch_warnings():
            # One scene is the whole input here: every split uses it, as intended.
            warnings.filterwarnings("ignore", message=r".*only 1 scene\(s\); train/val/test all use them")
            cli = stages.run(argv, plan.where)
        sub = plan.step.run
        resolved = stages.as_dict(cli.config[sub])
        text = json.dumps(resolved).replace(str(partial), str(self.step_dir(plan.step.name)))
        return {"resolved_config": json.loads(text)}

    @staticmethod
    def _commit(partial: Path, final: Path) -> None:
        """Put a finished step's folder in place: the old one (a rerun) goes aside first."""
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)


def _refs_in(step: Step) -> set[str]:
    return references(step.args) | references(step.ckpt_path)
