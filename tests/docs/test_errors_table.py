"""docs/errors.md quotes messages that the code still says: each quoted message's wording is in emakit's source.

A quoted message is compared by its wording only: values (quoted strings, numbers, paths, names with ``_``,
``.`` or ``=``, type and class names, OS errors' texts) and ``...`` are wildcards, in the quote and in the source's string literals (whose ``{...}``
fields are wildcards too). Every run of wording between wildcards, of 12 characters or more, must appear in
the wording of one string literal of ``src/emakit``, give or take up to three words at either end (a field that
holds a word, such as an argument's name or an OS error's text).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WILD = "\x00"
_VALUE = re.compile(
    r"'[^']*'|\"[^\"]*\"|\([^()]*\)|\[[^\[\]]*\]|<[^<>]*>|\.\.\.|…|[-+]?\d[\d.,e+-]*%?|[\w./-]*[_.=/\\][\w./=-]*|--[\w-]+"
    r"|\b(?:str|int|float|dict|list|tuple|bool|Algorithm|Callback)\b|\b[A-Z]+[a-z]+[A-Z]\w*|\b[A-Z]{2,}[a-z]+\w*"
    r"|Not a directory|Permission denied|Read-only file system"
)


def wording(text: str) -> str:
    """``text`` with its values replaced by a wildcard, whitespace collapsed."""
    text = _VALUE.sub(WILD, text)
    text = re.sub(r"\s+", " ", text)
    return re.sub(f"[ {WILD}]*{WILD}[ {WILD}]*", WILD, text)


def _literal_text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "'{}'" for v in node.values)  # type: ignore[misc]
    return None


def source_wordings() -> list[str]:
    found = []
    for path in (ROOT / "src" / "emakit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            text = _literal_text(node)
            if text and len(text) > 8:
                found.append(wording(text))
    return found


def quoted_messages() -> list[tuple[str, str]]:
    """(row number, message) for each message quoted in the table's error column."""
    out = []
    for line in (ROOT / "docs" / "errors.md").read_text().splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) < 4 or not cells[0].lstrip("| ").isdigit():
            continue
        for span in re.findall(r"`([^`]+)`", cells[2]):
            message = re.sub(r"^(\w+(Error|Exception|Warning)|emakit [\w-]+(: error)?): ", "", span)
            if len(message) >= 25 and " " in message:
                out.append((cells[0].lstrip("| "), message))
    return out


SOURCE = source_wordings()


def _trimmed(run: str) -> list[str]:
    """``run`` without up to three words at either end, keeping some wording (two words of 9 characters)."""
    words = run.split(" ")
    least = 1 if len(words) <= 3 else 2  # a short run may be mostly a field ("EMA state: tensor")
    variants = [" ".join(words[a : len(words) - b]) for a in range(4) for b in range(4) if len(words) - a - b >= least]
    return [v for v in variants if len(v) >= 6 * least - 3] or [run]


def _found(run: str) -> bool:
    return any(run in text for text in SOURCE)


@pytest.mark.parametrize(("row", "message"), quoted_messages(), ids=lambda v: str(v)[:40])
def test_each_quoted_message_is_worded_as_in_the_source(row: str, message: str) -> None:
    runs = [run.strip() for run in wording(message).split(WILD) if len(run.strip()) >= 12]
    missing = [run for run in runs if not any(_found(variant) for variant in _trimmed(run))]
    assert not missing, f"docs/errors.md row {row}: no message in src/emakit says {missing} (quoted: {message!r})"
