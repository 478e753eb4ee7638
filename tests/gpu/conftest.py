"""GPU tests: gsplat's CUDA extension is compiled once, under a file lock, before any test uses it.

gsplat builds its extension at first import (about 80 s on the device). Under pytest-xdist every
worker starts that build in the same folder at once, and the builds delete each other's objects
(seen on the H200: 12 tests failed with "can't create ....cuda.o"); with the lock one worker builds
and the others load the result. Modules that render ask for it (``usefixtures``): the others (the
attention, grid and video tests) do not wait for the build."""

from __future__ import annotations

import fcntl
import tempfile
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def gsplat_built_once():
    if not torch.cuda.is_available():
        return
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return
    with open(Path(tempfile.gettempdir()) / "fourdgen-gsplat-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        import gsplat.cuda._backend  # noqa: F401  (compiles on first import; later imports load it)
