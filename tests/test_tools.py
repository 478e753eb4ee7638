"""tools/ scripts."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import imageio.v2 as iio

_spec = importlib.util.spec_from_file_location(
    "inspect_scene", Path(__file__).resolve().parents[1] / "tools" / "inspect_scene.py"
)
inspect_scene = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(inspect_scene)


def test_inspect_scene_summary_and_sheet(tiny_scene_dir, tmp_path, capsys):
    assert inspect_scene.main([str(tiny_scene_dir), "--sheet", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "4 views x 6 frames, 40x32" in out and "cameras static" in out and "depth=True" in out
    assert iio.imread(tmp_path / "s.png").shape == (4 * 32, 6 * 40, 3)


def test_inspect_scene_reports_format_errors(tiny_scene_dir, tmp_path, capsys):
    root = tmp_path / "bad"
    shutil.copytree(tiny_scene_dir, root)
    meta = json.loads((root / "scene.json").read_text())
    meta["views"][1]["K"] = [[1, 0], [0, 1]]
    (root / "scene.json").write_text(json.dumps(meta))
    assert inspect_scene.main([str(root)]) == 1
    assert "views[1].K" in capsys.readouterr().err
