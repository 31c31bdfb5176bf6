"""Launch a 2-rank worker under torchrun (CPU, gloo) and read back the ``OUT/rank{r}.pt`` files it writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def two_ranks(worker: Path, out: Path, timeout: int = 300) -> list[dict[str, Any]]:
    """Run ``worker OUT`` on 2 ranks; each rank's results, or a failure showing the launch's output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    files = [out / f"rank{r}.pt" for r in range(2)]
    assert all(f.is_file() for f in files), result.stdout[-3000:] + result.stderr[-6000:]
    return [torch.load(f, weights_only=True) for f in files]
