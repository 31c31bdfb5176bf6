"""docs/averaging-checkpoints.md's Python blocks run as written, and its command lines parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from emakit.checkpoint.average_cli import build_parser

DOC = Path(__file__).resolve().parents[2] / "docs" / "averaging-checkpoints.md"
TEXT = DOC.read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", TEXT, flags=re.S | re.M)
COMMANDS = [line for line in re.findall(r"^emakit average (.+)$", TEXT, flags=re.M) if "[" not in line]


def test_the_doc_has_python_blocks_and_commands() -> None:
    assert BLOCKS and len(COMMANDS) == 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_block_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {"__name__": "__doc_block__"})


@pytest.mark.parametrize("command", COMMANDS)
def test_command_lines_parse(command: str) -> None:
    args = build_parser().parse_args(shlex.split(command))
    assert args.out and len(args.checkpoints) >= 2
