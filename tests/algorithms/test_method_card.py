"""Run every python code block of the EMA method card and the README, as written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from docs._blocks import python_blocks

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "src/emakit/algorithms/ema/README.md"]  # README and docs/ blocks run in tests/docs/test_blocks.py


BLOCKS = [(path, i, code) for path in DOCS for i, code in enumerate(python_blocks(path))]


def test_method_card_has_blocks() -> None:
    assert len(python_blocks(DOCS[0])) >= 3


def prelude() -> dict[str, object]:
    """What the README's examples take as given, as in the method card: a model and a train_dataloader."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    data = TensorDataset(torch.randn(128, 4), torch.randint(0, 3, (128,)))
    return {"__name__": "readme_block", "model": model, "train_dataloader": DataLoader(data, batch_size=16)}


@pytest.mark.parametrize(("path", "index", "code"), BLOCKS, ids=[f"{p.parent.name}/{p.name}#{i}" for p, i, _ in BLOCKS])
def test_code_block_runs(path: Path, index: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may write files (an export, a checkpoint)
    namespace = prelude()
    exec(compile(code, f"{path.name}#{index}", "exec"), namespace)
    if "def training_loop" in code:  # the functional example defines the loop; run it
        ema_model = namespace["training_loop"](namespace["model"], namespace["train_dataloader"])  # type: ignore[operator]
        assert isinstance(ema_model, nn.Module)


def test_method_card_examples_verbatim_with_names_swapped() -> None:
    """The two examples of Composer's method card, with emakit's module names in place of Composer's."""
    own_loop, trainer_page = ROOT / "docs/guides/own-loop.md", ROOT / "docs/guides/trainer.md"
    assert "ef.compute_ema(model, ema_model, smoothing=0.99)" in own_loop.read_text()
    assert 'ema = EMA(half_life="50ba")' in trainer_page.read_text()
    namespace = prelude()
    trainer_block = next(code for code in python_blocks(trainer_page) if "Trainer(" in code)
    exec(compile(trainer_block, "docs/guides/trainer.md", "exec"), namespace)
    assert isinstance(namespace["model"], nn.Module)
    assert namespace["model"] is namespace["ema"].ema_model  # type: ignore[attr-defined]
