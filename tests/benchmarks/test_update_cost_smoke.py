"""``benchmarks/update_cost.py`` (the same as ``emakit bench``) runs as a script and prints its tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "update_cost.py"


@pytest.mark.slow
def test_the_script_runs_in_quick_mode() -> None:
    argv = [
        "--quick",
        "--no-peers",
        "--no-step",
        "--no-mixed",
        "--no-overlap",
        "--shapes",
        "mlp,resnet",
        "--repeats",
        "1",
    ]
    result = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for title in ("== update cost, mlp:", "== update cost, resnet:", "== several averages in one update, resnet:"):
        assert title in result.stdout, title
    assert "emakit compute_ema (models as they are)" in result.stdout
