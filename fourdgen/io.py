"""Atomic file writes: a crash mid-write never leaves a truncated file behind.

Every output fourdgen writes (scenes, PLYs, videos, exported weights) goes through
:func:`atomic_path`: write to a temporary file in the destination directory, then
``os.replace`` it over the target (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    ``suffix`` defaults to the target's suffix so writers that pick a format by extension
    (imageio, PIL, numpy) still see the right one. On error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix if suffix is None else suffix
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_tensors(path: str | os.PathLike) -> dict:
    """The tensors of a user's ``.safetensors`` file; a file that does not read (missing, empty,
    truncated, not safetensors) is one :class:`~fourdgen.errors.FileFormatError` naming it, not
    safetensors' own error."""
    from safetensors.torch import load_file

    from fourdgen.errors import FileFormatError, short_error

    p = Path(path)
    if not p.is_file():
        raise FileFormatError(p, "<file>", "an existing .safetensors file", "missing")
    try:
        return load_file(str(p))
    except Exception as e:  # SafetensorError (header too small, incomplete metadata ...), OSError
        raise FileFormatError(p, "<file>", "a complete .safetensors file", short_error(e)) from None


def check_tensor(file, key: str, t, shape: tuple[int, ...] | None = None) -> None:
    """``t`` is a floating-point tensor of ``shape`` (None: any) with finite values, or one
    :class:`~fourdgen.errors.FileFormatError` naming ``file`` and the tensor ``key``."""
    import torch

    from fourdgen.errors import FileFormatError

    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise FileFormatError(file, key, "a floating-point tensor", got)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise FileFormatError(file, key, f"shape {list(shape)}", list(t.shape))
    if not torch.isfinite(t).all():
        raise FileFormatError(file, key, "finite values", "NaN or inf")


def read_cache(path: str | os.PathLike, keys: tuple[str, ...] = ()) -> dict | None:
    """The tensors of a cache file fourdgen wrote (safetensors), or None when it is missing or
    unreadable (truncated, corrupted on disk, another layout, non-finite values): the caller then
    recomputes and rewrites it, so a damaged cache costs time, not the run. Unreadable ones warn."""
    import warnings

    import torch
    from safetensors.torch import load_file

    from fourdgen.errors import short_error

    p = Path(path)
    if not p.is_file():
        return None
    try:
        d = load_file(str(p))
        missing = [k for k in keys if k not in d]
        if missing:
            raise KeyError(f"no tensor {missing[0]!r}")
        bad = [k for k, v in d.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"non-finite values in {bad[0]!r}")
    except Exception as e:  # safetensors' SafetensorError derives from Exception only
        warnings.warn(f"{p}: unreadable cache file ({short_error(e)}); recomputing it", stacklevel=2)
        return None
    return d


# ----------------------------------------------------------------------------- output folders
MANIFEST = ".fourdgen.json"


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest fourdgen left in ``folder`` when it wrote it, or None."""
    path = Path(folder) / MANIFEST
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def write_manifest(folder: str | os.PathLike, kind: str, **fields: Any) -> None:
    """Mark ``folder`` as written by fourdgen (``kind``: which writer; ``fields``: e.g. the step)."""
    write_json(Path(folder) / MANIFEST, {"writer": kind, **fields})


def claim_output_dir(
    folder: str | os.PathLike, kind: str, step: int | None = None, overwrite: bool = False, what: str = ""
) -> None:
    """Check that ``kind`` may write into ``folder``, or raise :class:`OutputExistsError`.

    Allowed: a missing or empty folder; one that the same writer filled at a step no later than
    ``step``; anything when ``overwrite``. A folder holding files fourdgen did not write, or the
    outputs of a longer run, is never replaced without ``overwrite`` (``--overwrite`` on the CLI).
    ``what`` names the config entry that chose the folder, for the message.
    """
    from fourdgen.errors import OutputExistsError

    folder = Path(folder)
    if overwrite or not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return
    where = f" ({what})" if what else ""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("writer") != kind:
        by = "files fourdgen did not write" if manifest is None else f"{manifest.get('writer')} outputs"
        raise OutputExistsError(
            f"{folder}{where}: holds {by}; refusing to write {kind} outputs into it. Choose another "
            "folder, or pass --overwrite to replace them."
        )
    old = manifest.get("step")
    if step is not None and isinstance(old, int) and old > step:
        raise OutputExistsError(
            f"{folder}{where}: holds {kind} outputs of step {old}; this run would replace them with "
            f"step {step}. Choose another folder, or pass --overwrite to replace them."
        )


# --------------------------------------------------------------------------------- checkpoints
def replace_path(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a finished file or folder ``src`` onto ``dst``. A file is one ``os.replace``; a folder
    (a sharded checkpoint) cannot replace a non-empty one atomically, so the old one goes aside
    first and is removed only after the new one is in place."""
    import shutil

    src, dst = Path(src), Path(dst)
    if src.is_dir() and dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def check_checkpoint_file(path: str | os.PathLike, what: str = "--ckpt_path") -> None:
    """Raise one :class:`~fourdgen.errors.ConfigError` naming ``path`` when it cannot be a complete
    checkpoint: missing, empty, or a file that is not a whole zip archive (``torch.save``'s format
    since torch 1.6; a truncated write loses the zip's central directory at its end). Sharded
    checkpoints (folders) must hold torch.distributed.checkpoint's ``.metadata``. Reads the zip
    directory only, not the tensors."""
    import zipfile

    from fourdgen.errors import ConfigError

    p = Path(path)
    if not p.exists():
        old = p.with_name(f".{p.name}.old")  # replace_path's aside copy: killed between its two renames
        hint = f" (the previous one is {old}: rename it back to resume from it)" if old.is_dir() else ""
        raise ConfigError(f"{what} {p}: no such file or folder{hint}")
    if p.is_dir():
        for name in (".metadata", "meta.pt"):  # torch.distributed.checkpoint's index, Lightning's state
            if not (p / name).is_file():
                raise ConfigError(
                    f"{what} {p}: a folder without {name}, so not a complete sharded checkpoint (a "
                    "ModelParallelStrategy checkpoint holds .metadata, __<rank>_0.distcp and meta.pt; "
                    "interrupted while saving?); resume from an earlier checkpoint"
                )
        return
    size = p.stat().st_size
    if size == 0 or not zipfile.is_zipfile(p):
        raise ConfigError(
            f"{what} {p}: not a complete PyTorch checkpoint ({size} bytes, no zip directory at its end: "
            "truncated, still being written, or another kind of file); resume from an earlier checkpoint"
        )
