"""docs/guides/accelerate.md: its ZeRO-3 script runs as written on 2 CPU ranks, then again, resuming.

Expectations: the validation loss each run prints equals the loss of the exported file loaded into the plain
module by hand; the second run resumed (its step count continues the first's) and its EMA moved on; the
checkpoint holds one EMA file per rank and no registered object.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from _launch import deepspeed_env
from test_deepspeed_docs import loss_of_export

from docs._blocks import code_blocks

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

PAGE = Path(__file__).resolve().parents[2] / "docs" / "guides" / "accelerate.md"

pytestmark = pytest.mark.slow


def script() -> str:
    (block,) = [b for b in code_blocks(PAGE) if b.first_line.startswith("# train_accelerate_zero3.py")]
    assert block.not_run is not None and "tests/zero/test_accelerate_docs.py" in block.not_run
    return block.code


def test_accelerate_zero3_script_trains_evaluates_resumes_and_exports(tmp_path: Path) -> None:
    (tmp_path / "train_accelerate_zero3.py").write_text(script())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    printed = []
    for _ in range(2):
        result = subprocess.run(
            [*command, "train_accelerate_zero3.py"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env=deepspeed_env(),
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        (line,) = re.findall(r"step (\d+): validation loss on the EMA ([\d.]+)", result.stdout)
        printed.append((int(line[0]), float(line[1])))
        assert printed[-1][1] == pytest.approx(loss_of_export(tmp_path / "ema.safetensors"), abs=2e-6)
        names = {p.name for p in (tmp_path / "ckpt").iterdir()}
        assert {"emakit_ema_rank0.pt", "emakit_ema_rank1.pt"} <= names
        assert not any(name.startswith("custom_checkpoint") for name in names)
    assert [step for step, _ in printed] == [30, 60]
    assert printed[0][1] != printed[1][1]
