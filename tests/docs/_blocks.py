"""Fenced code blocks of a Markdown file, for tests that run documentation as written."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PYTHON_FENCES", "Block", "code_blocks", "python_blocks"]

#: Info strings of the fences whose code is Python.
PYTHON_FENCES = ("python", "py", "python3")

# A fence at the start of a line, its info string, the code, and the closing fence at the start of a line.
_FENCE_RE = re.compile(r"^```([^\n`]*)\n(.*?)^```", flags=re.S | re.M)


@dataclass(frozen=True)
class Block:
    """One fenced block: the file, the 1-based line of its opening fence, its language and its code."""

    path: Path
    line: int
    language: str
    code: str

    @property
    def first_line(self) -> str:
        """The first line of code, stripped (where a block carries a marker comment such as ``# torchrun``)."""
        return self.code.lstrip("\n").split("\n", 1)[0].strip()

    @property
    def name(self) -> str:
        """``README.md:42``, for test ids and compile() file names."""
        return f"{self.path.name}:{self.line}"


def code_blocks(path: Path, languages: tuple[str, ...] = PYTHON_FENCES) -> list[Block]:
    """The fenced blocks of ``path`` whose info string's first word is one of ``languages``, in file order."""
    text = path.read_text()
    blocks = []
    for match in _FENCE_RE.finditer(text):
        info = match.group(1).strip().split()
        if info and info[0].lower() in languages:
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(Block(path, line, info[0].lower(), match.group(2)))
    return blocks


def python_blocks(path: Path) -> list[str]:
    """The code of every ```` ```python ```` block of ``path`` (the method card's test reads these)."""
    return [block.code for block in code_blocks(path, ("python",))]
