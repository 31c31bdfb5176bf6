"""Fenced code blocks of a Markdown file, for tests that run documentation as written."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PYTHON_FENCES", "Block", "code_blocks", "python_blocks", "section_blocks"]

#: Info strings of the fences whose code is Python.
PYTHON_FENCES = ("python", "py", "python3")

# A fence at the start of a line, its info string, the code, and the closing fence at the start of a line.
_FENCE_RE = re.compile(r"^```([^\n`]*)\n(.*?)^```", flags=re.S | re.M)
# The marker of a block that is not run, on the line just above its fence: <!-- not run: why -->.
_NOT_RUN_RE = re.compile(r"<!--\s*not run:((?:(?!-->).)*)-->\s*\n\Z", flags=re.S)


@dataclass(frozen=True)
class Block:
    """One fenced block: the file, the 1-based line of its opening fence, its language and its code."""

    path: Path
    line: int
    language: str
    code: str
    #: The reason given by a ``<!-- not run: ... -->`` comment just above the fence ("" if it gives none),
    #: or None when the block has no such comment.
    not_run: str | None = None

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
        language = info[0].lower() if info else ""
        if language in languages:
            line = text.count("\n", 0, match.start()) + 1
            above = _NOT_RUN_RE.search(text, max(0, match.start() - 1000), match.start())
            reason = above.group(1).strip() if above else None
            blocks.append(Block(path, line, language, match.group(2), reason))
    return blocks


def section_blocks(path: Path, title: str, languages: tuple[str, ...] = PYTHON_FENCES) -> list[str]:
    """The code of the blocks of the section ``## <title>`` of ``path`` (up to the next ``## `` heading), or
    of the whole page when ``title`` is its ``# `` title."""
    text = path.read_text()
    if text.startswith(f"# {title}\n"):
        section = text
    else:
        start = text.index(f"\n## {title}\n")
        end = text.find("\n## ", start + 1)
        section = text[start : end if end != -1 else len(text)]
    return [block.code for block in code_blocks_in(section, path, languages)]


def code_blocks_in(text: str, path: Path, languages: tuple[str, ...]) -> list[Block]:
    """The blocks of ``text`` (a part of ``path``) in the given languages."""
    blocks = []
    for match in _FENCE_RE.finditer(text):
        info = match.group(1).strip().split()
        if info and info[0].lower() in languages:
            blocks.append(Block(path, text.count("\n", 0, match.start()) + 1, info[0].lower(), match.group(2)))
    return blocks


def python_blocks(path: Path) -> list[str]:
    """The code of every ```` ```python ```` block of ``path`` (the method card's test reads these)."""
    return [block.code for block in code_blocks(path, ("python",))]
