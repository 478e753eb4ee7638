from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Two-core CI machine: keep torch from oversubscribing (one thread per xdist worker).
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1)
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _restore_threads():
    """Recipes set torch's thread count (``num_threads``) for the whole process: a CLI test must
    not change what later tests run with (e.g. the reconstructor's learning test diverges on 1)."""
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def tiny_synthetic():
    """A small synthetic scene (4 views x 6 frames, 32 x 40 px) shared by tests."""
    from fourdgen.data.synthetic import SyntheticConfig, make_scene

    return make_scene(SyntheticConfig(num_views=4, num_frames=6, height=32, width=40, supersample=1, seed=3))


@pytest.fixture(scope="session")
def tiny_scene_dir(tmp_path_factory, tiny_synthetic):
    """``tiny_synthetic`` written in the scene format (PNG frames)."""
    return tiny_synthetic.write(tmp_path_factory.mktemp("scene") / "tiny")


@pytest.fixture(scope="session")
def official_vggt():
    """The official VGGT package (facebookresearch/vggt's ``vggt/`` source, never vendored) for
    parity tests, found under $VGGT_REPO or ``<repo>/.ref``; tests using it skip without it."""
    root = os.environ.get("VGGT_REPO") or str(Path(__file__).resolve().parents[1] / ".ref")
    if os.path.isdir(os.path.join(root, "vggt")) and root not in sys.path:
        sys.path.insert(0, root)
    return pytest.importorskip("vggt")


@pytest.fixture(scope="session")
def vggt_goldens():
    """Outputs of the official VGGT code recorded by ``tools/make_vggt_goldens.py`` (small models
    with seed-derived weights): ``(tool module, tensors, metadata)``. Needs no official source."""
    import importlib.util
    import json

    from safetensors import safe_open

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_vggt_goldens", root / "tools/make_vggt_goldens.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with safe_open(root / "tests" / "data" / "vggt_goldens.safetensors", "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    # the file was made by this version of the tool (same sizes, same seed): else rerun the tool
    assert json.loads(meta["config"]) == json.loads(json.dumps(tool.CONFIG))
    assert int(meta["seed"]) == tool.SEED
    return tool, tensors, meta
