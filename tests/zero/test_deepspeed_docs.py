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
    assert block.not_run is not None and "tests/zero/test_deepspeed_docs.py" in block.not_run
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


def trainer_script() -> str:
    (block,) = [b for b in code_blocks(PAGE) if b.first_line.startswith("# train_trainer_zero3.py")]
    assert block.not_run is not None and "tests/zero/test_deepspeed_docs.py" in block.not_run
    return block.code


def trainer_loss_of_export(path: Path) -> float:
    """The export's eval_loss as the Trainer counts it: summed next-token loss over all label tokens."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=8, n_embd=32, n_layer=2, n_head=2))
    model.load_state_dict(load_file(str(path)))
    model.eval()  # GPT-2's default dropout, off in evaluation as in the Trainer's
    tokens = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    summed = F.cross_entropy(logits[:, :-1].reshape(-1, 64), tokens[:, 1:].reshape(-1), reduction="sum")
    return summed.item() / tokens.numel()


def test_trainer_zero3_script_trains_evaluates_resumes_and_exports(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    (tmp_path / "train_trainer_zero3.py").write_text(trainer_script())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    printed = []
    for _ in range(2):
        result = subprocess.run(
            [*command, "train_trainer_zero3.py"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env=deepspeed_env(),
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        (line,) = re.findall(r"step (\d+): validation loss on the EMA ([\d.]+)", result.stdout)
        printed.append((int(line[0]), float(line[1])))
        assert printed[-1][1] == pytest.approx(trainer_loss_of_export(tmp_path / "ema.safetensors"), abs=2e-6)
    assert [step for step, _ in printed] == [10, 20]
    assert printed[0][1] != printed[1][1]
    for step in (10, 20):
        names = {p.name for p in (tmp_path / "out" / f"checkpoint-{step}").iterdir()}
        assert {"ema_weights.safetensors", "emakit_ema_rank0.pt", "emakit_ema_rank1.pt"} <= names
