"""``benchmarks/writeback_cost.py`` runs and times every row on one model (its figures are printed, never asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "writeback_cost.py"


def test_every_row_is_timed_on_a_small_model() -> None:
    spec = importlib.util.spec_from_file_location("writeback_cost", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["writeback_cost"] = module
    spec.loader.exec_module(module)
    times = module.measure(params=2**20, repeats=2, dtype=torch.float32)
    assert list(times) == list(module.rows())
    assert all(seconds > 0 for seconds in times.values())
