"""Griffe extension: show the Sphinx roles of emakit's docstrings (:func:`x`, :class:`~a.B`) as code.

emakit's docstrings are Google style with reStructuredText roles for names; mkdocstrings renders Markdown, where
a role would appear as raw text. ``~a.b.C`` shows ``C``, as Sphinx does.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")


def _as_code(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRoles(Extension):
    """Rewrite roles in every docstring griffe loads."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_as_code, obj.docstring.value)
