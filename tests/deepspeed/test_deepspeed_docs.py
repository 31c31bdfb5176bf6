"""docs/guides/deepspeed.md: its ZeRO-3 script runs as written on 2 CPU ranks, then again, resuming.

Expectations: the validation loss each run prints equals the loss of the exported file loaded into the plain
module by hand; the second run resumed (its step count continues the first's) and its EMA moved on.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _launch import deepspeed_env
from torch import nn

from docs._blocks import code_blocks

pytest.importorskip("deepspeed")

PAGE = Path(__file__).resolve().parents[2] / "docs" / "guides" / "deepspeed.md"

pytestmark = pytest.mark.slow


def script() -> str:
    (block,) = [b for b in code_blocks(PAGE) if b.first_line.startswith("# train_zero3.py")]
    assert block.not_run is not None and "tests/deepspeed/test_deepspeed_docs.py" in block.not_run
    return block.code


def loss_of_export(path: Path) -> float:
    from safetensors.torch import load_file

    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3))
    model.load_state_dict(load_file(str(path)))
    x_val = torch.randn(64, 16, generator=torch.Generator().manual_seed(100))
    with torch.no_grad():
        return F.cross_entropy(model(x_val), (x_val[:, 0] > 0).long()).item()


def test_zero3_script_trains_evaluates_resumes_and_exports(tmp_path: Path) -> None:
    (tmp_path / "train_zero3.py").write_text(script())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_zero3.py"]
    printed = []
    for _ in range(2):
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=deepspeed_env())
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        (line,) = re.findall(r"step (\d+): validation loss on the EMA ([\d.]+)", result.stdout)
        printed.append((int(line[0]), float(line[1])))
        assert printed[-1][1] == pytest.approx(loss_of_export(tmp_path / "ema.safetensors"), abs=2e-6)
        assert sorted(p.name for p in (tmp_path / "ckpt").glob("ema_rank*.pt")) == ["ema_rank0.pt", "ema_rank1.pt"]
    assert [step for step, _ in printed] == [30, 60]
    assert printed[0][1] != printed[1][1]
