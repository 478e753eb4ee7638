from __future__ import annotations

import os

import pytest
import torch

# Two-core CI machine: keep torch from oversubscribing.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_synthetic():
    """A small synthetic scene (4 views x 6 frames, 32 x 40 px) shared by tests."""
    from fourdgen.data.synthetic import SyntheticConfig, make_scene

    return make_scene(SyntheticConfig(num_views=4, num_frames=6, height=32, width=40, supersample=1, seed=3))


@pytest.fixture(scope="session")
def tiny_scene_dir(tmp_path_factory, tiny_synthetic):
    """``tiny_synthetic`` written in the scene format (PNG frames)."""
    return tiny_synthetic.write(tmp_path_factory.mktemp("scene") / "tiny")
