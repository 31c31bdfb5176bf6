"""The python blocks of one README section, to run them verbatim as the README shows them."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).parents[2] / "README.md"


def readme_blocks(title: str) -> list[str]:
    """The ```python blocks of the section ``## <title>`` (up to the next ``## `` heading)."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return [block.split("\n```", 1)[0] for block in section.split("```python\n")[1:]]
