"""``benchmarks/fsdp_ema.py --quick`` runs on 2 CPU ranks and prints its tables (figures printed, not asserted).

What is asserted is structure that does not depend on timing: every row is there, and an FSDP2 rank keeps
about half of the EMA bytes a DDP rank keeps.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fsdp_ema.py"


@pytest.mark.slow
def test_quick_run_prints_update_and_export_tables() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout)
    rows = {
        (m["strategy"], int(m["rank"])): float(m["kib"])
        for m in re.finditer(
            r"^(?P<strategy>ddp|fsdp2)\s+(?P<rank>\d)\s+[\d.]+\s+(?P<kib>[\d.]+)$", result.stdout, re.M
        )
    }
    assert set(rows) == {("ddp", 0), ("ddp", 1), ("fsdp2", 0), ("fsdp2", 1)}
    for rank in (0, 1):
        assert rows[("fsdp2", rank)] == pytest.approx(rows[("ddp", rank)] / 2, rel=0.01)
    for label in ("safetensors, one file", "sharded layout", ".pt (torch.save)"):
        assert re.search(rf"^{re.escape(label)}.*\s[\d.]+\s+[\d.]+\s+[\d.]+$", result.stdout, re.M), label
