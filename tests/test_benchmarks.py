"""``benchmarks/run_all.py`` at toy sizes on the CPU: every figure of the performance table is
measured beside its reference and lands in the table (the paper sizes run on the GPU)."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import torch


def test_run_all_measures_every_figure_beside_its_reference(monkeypatch, capsys):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the recipes are repo-relative
    torch.manual_seed(0)
    figures = runpy.run_path("benchmarks/run_all.py")["main"](["--tiny"])
    # P1: auto and lse fwd, fwd+bwd, and auto with heads inner; P2: 3 policies x 2 couplings
    assert [f.id for f in figures] == ["P1"] * 6 + ["P1b"] + ["P2"] * 6 + ["P3", "P4"]
    for f in figures:
        assert f.value > 0 and f.reference > 0 and math.isfinite(f.ratio), f
    printed = capsys.readouterr().out
    rows, table = printed.split("rows as they come", 1)[1], printed.rsplit("device: cpu", 1)[1]
    assert rows.count("\n| P") == 2 * len(figures), printed  # each row as measured, then in the table
    assert table.count("\n| P") == len(figures), printed
    assert "MFU" in printed and "ideal (dense x" in printed
