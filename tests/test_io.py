"""Atomic writes: complete file or nothing, with the permissions a plain open() gives."""

from __future__ import annotations

import os

import pytest

from fourdgen.io import atomic_path, write_json


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_json(target, {"x": 1})
    assert target.read_text().strip().startswith("{")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("writer failed")
    assert target.read_text().strip() == '{\n  "x": 1\n}'  # the old file survives
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]  # no temp left behind
