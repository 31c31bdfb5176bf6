"""The python blocks of one section of a guide page, to run them verbatim as the page shows them."""

from __future__ import annotations

from pathlib import Path

GUIDES = Path(__file__).parents[2] / "docs" / "guides"


def readme_blocks(title: str, page: str) -> list[str]:
    """The ```python blocks of the section ``## <title>`` of ``docs/guides/<page>`` (up to the next ``## ``
    heading); the page's own ``# <title>`` heading counts as a section too."""
    text = ("\n" + (GUIDES / page).read_text()).replace(f"\n# {title}\n", f"\n## {title}\n", 1)
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return [block.split("\n```", 1)[0] for block in section.split("```python\n")[1:]]
