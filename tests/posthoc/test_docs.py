"""docs/posthoc.md's Python blocks run as written (fresh namespace, empty folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "posthoc.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def test_the_doc_has_python_blocks() -> None:
    assert BLOCKS


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_block_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__doc_block__"}
    exec(compile(code, str(DOC), "exec"), namespace)
    if "ema_007" in namespace:  # the usage block: the reconstructed average is what the model now holds
        import torch

        model, ema = namespace["model"], namespace["ema_007"]
        assert isinstance(model, torch.nn.Module) and isinstance(ema, dict)
        assert all(torch.equal(t, ema[n]) for n, t in model.state_dict().items())
