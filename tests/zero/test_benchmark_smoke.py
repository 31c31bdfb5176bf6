"""``benchmarks/zero_ema.py --quick`` runs on 2 CPU ranks and prints its tables (figures printed, not asserted).

What is asserted is structure that does not depend on timing: every row is there, and a ZeRO-3 rank keeps half
of the EMA bytes a DDP or ZeRO-2 rank keeps.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from _launch import deepspeed_env

pytest.importorskip("deepspeed")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "zero_ema.py"


@pytest.mark.slow
def test_quick_run_prints_update_and_export_tables() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=300, env=deepspeed_env()
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout)
    rows = {
        (m["strategy"], int(m["rank"])): float(m["kib"])
        for m in re.finditer(
            r"^(?P<strategy>ddp|zero2|zero3)\s+(?P<rank>\d)\s+[\d.]+\s+(?P<kib>[\d.]+)$", result.stdout, re.M
        )
    }
    assert set(rows) == {(s, r) for s in ("ddp", "zero2", "zero3") for r in (0, 1)}
    for rank in (0, 1):
        assert rows[("zero2", rank)] == rows[("ddp", rank)]
        assert rows[("zero3", rank)] == pytest.approx(rows[("ddp", rank)] / 2, rel=0.01)
    for label in ("safetensors, one file", "sharded layout", ".pt (torch.save)"):
        assert re.search(rf"^{re.escape(label)}.*\s[\d.]+\s+[\d.]+\s+[\d.]+$", result.stdout, re.M), label
