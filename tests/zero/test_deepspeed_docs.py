"""The ZeRO-3 scripts of docs/guides/deepspeed.md (DeepSpeed's loop, the Transformers Trainer) and
docs/guides/accelerate.md (Accelerate's DeepSpeed plugin) run as written on 2 CPU ranks, then again, resuming.

Expectations: the validation loss each run prints equals the loss of the exported file loaded into the plain
module by hand; the second run resumed (its step count continues the first's) and its EMA moved on; the
checkpoint holds one EMA file per rank.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _launch import deepspeed_env, torchrun
from torch import nn

from docs._blocks import code_blocks

pytest.importorskip("deepspeed")

GUIDES = Path(__file__).resolve().parents[2] / "docs" / "guides"
PAGE = GUIDES / "deepspeed.md"

pytestmark = pytest.mark.slow


def script(first_line: str, page: Path = PAGE) -> str:
    (block,) = [b for b in code_blocks(page) if b.first_line.startswith(first_line)]
    assert block.not_run is not None and "tests/zero/test_deepspeed_docs.py" in block.not_run
    return block.code


def loss_of_export(path: Path) -> float:
    from safetensors.torch import load_file

    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3))
    model.load_state_dict(load_file(str(path)))
    x_val = torch.randn(64, 16, generator=torch.Generator().manual_seed(100))
    with torch.no_grad():
        return F.cross_entropy(model(x_val), (x_val[:, 0] > 0).long()).item()


def run_twice(
    tmp_path: Path, name: str, code: str, loss_of: Callable[[Path], float], timeout: int = 300
) -> list[tuple[int, float]]:
    """Run the script ``code`` as ``name`` twice on 2 ranks in ``tmp_path``: each run's (step, printed loss),
    the loss checked against ``loss_of`` the export that run wrote."""
    (tmp_path / name).write_text(code)
    printed = []
    for _ in range(2):
        stdout = torchrun(name, env=deepspeed_env(), cwd=tmp_path, timeout=timeout)
        (line,) = re.findall(r"step (\d+): validation loss on the EMA ([\d.]+)", stdout)
        printed.append((int(line[0]), float(line[1])))
        assert printed[-1][1] == pytest.approx(loss_of(tmp_path / "ema.safetensors"), abs=2e-6)
    return printed


def test_zero3_script_trains_evaluates_resumes_and_exports(tmp_path: Path) -> None:
    printed = run_twice(tmp_path, "train_zero3.py", script("# train_zero3.py"), loss_of_export)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("ema_rank*.pt")) == ["ema_rank0.pt", "ema_rank1.pt"]
    assert [step for step, _ in printed] == [30, 60]
    assert printed[0][1] != printed[1][1]


def test_accelerate_zero3_script_trains_evaluates_resumes_and_exports(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    code = script("# train_accelerate_zero3.py", GUIDES / "accelerate.md")
    printed = run_twice(tmp_path, "train_accelerate_zero3.py", code, loss_of_export)
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"emakit_ema_rank0.pt", "emakit_ema_rank1.pt"} <= names  # written by save_state's hooks
    assert not any(name.startswith("custom_checkpoint") for name in names)
    assert [step for step, _ in printed] == [30, 60]
    assert printed[0][1] != printed[1][1]


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
    code = script("# train_trainer_zero3.py")
    printed = run_twice(tmp_path, "train_trainer_zero3.py", code, trainer_loss_of_export, timeout=600)
    assert [step for step, _ in printed] == [10, 20]
    assert printed[0][1] != printed[1][1]
    for step in (10, 20):
        names = {p.name for p in (tmp_path / "out" / f"checkpoint-{step}").iterdir()}
        assert {"ema_weights.safetensors", "emakit_ema_rank0.pt", "emakit_ema_rank1.pt"} <= names
