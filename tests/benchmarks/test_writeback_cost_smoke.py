"""The rules' and write-back's cost rows (:mod:`emakit.bench.rules`, used by ``emakit bench`` and the two
benchmark scripts) each run on a small model, and the scripts run (figures printed, never asserted)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

from emakit.bench.rules import measure, rule_rows, theta0_bytes, writeback_rows

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_row_is_timed_on_a_small_model(dtype: torch.dtype) -> None:
    rows = {**rule_rows(), **writeback_rows()}
    times = measure(rows, params=2**12, repeats=2, dtype=dtype)
    assert list(times) == list(rows) and all(seconds > 0 for seconds in times.values())


def test_bemas_theta_0_is_kept_in_the_models_dtype() -> None:
    assert (theta0_bytes(2**12, torch.float32), theta0_bytes(2**12, torch.bfloat16)) == (4.0, 2.0)


@pytest.mark.parametrize("script", ["frontier_rules.py", "writeback_cost.py"])
def test_the_scripts_print_a_ratio_per_row(
    script: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", [script, "--params", "4096", "--repeats", "2"])
    runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    lines = [line for line in capsys.readouterr().out.splitlines() if "of a plain EMA update" in line]
    rows = rule_rows() if script == "frontier_rules.py" else writeback_rows()
    assert len(lines) == len(rows) * (1 if script == "frontier_rules.py" else 2)
    assert all(line.strip().startswith(name) for line, name in zip(lines, [*rows] * 2, strict=False))
