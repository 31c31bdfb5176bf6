"""``export_ema_weights`` under FSDP2 on 2 real ranks: a call made on rank 0 only fails within a bounded time with
a message saying what to do, instead of hanging in the gathers; a path refused on rank 0 is refused on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("_rank0_export_worker.py")

pytestmark = pytest.mark.slow


def test_rank0_only_export_fails_with_a_message_and_refusals_reach_every_rank(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    result = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    alone = ranks[0]["rank0_only"]
    assert alone["error"] == "RuntimeError"
    assert "export_ema_weights: only 1 of 2 ranks reached it within 3 s" in alone["message"]
    assert "not inside `if rank == 0:`" in alone["message"]
    assert 3.0 <= alone["seconds"] < 30.0
    assert not (tmp_path / "rank0_only.safetensors").exists()

    assert ranks[0]["refused"]["error"] == "FileExistsError"
    assert ranks[1]["refused"]["error"] == "ValueError"
    for rank in ranks:
        assert "taken.safetensors' exists; pass overwrite=True" in rank["refused"]["message"]
    assert (tmp_path / "taken.safetensors").read_bytes() == b"the user's file"

    assert ranks[0]["every_rank"]["error"] is None and ranks[1]["every_rank"]["error"] is None
    assert set(load_file(tmp_path / "ema.safetensors")) == {"0.weight", "0.bias", "2.weight", "2.bias"}
