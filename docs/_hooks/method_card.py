"""MkDocs hook: the site's method-card page is the method card shipped in the package, as it is.

The card lives at src/emakit/algorithms/ema/README.md (it is installed with emakit and its code blocks run in
tests/algorithms/test_method_card.py); this hook reads it when the site is built, so the page cannot drift
from it, and rewrites its links into docs/ (``../../../../docs/x.md``) into links between site pages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CARD = Path("src/emakit/algorithms/ema/README.md")
PAGE = "method-card.md"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the placeholder page's text with the card's, links rewritten."""
    if page.file.src_uri != PAGE:
        return markdown
    root = Path(config.config_file_path).parent
    card = (root / CARD).read_text(encoding="utf-8")
    return card.replace("](../../../../docs/", "](")
