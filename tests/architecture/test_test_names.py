"""Test modules are collected by basename (tests/ folders are not packages): two ``test_x.py`` in different folders
stop the whole run at collection, so every test module's basename is unique."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique() -> None:
    names = Counter(
        p.name for p in TESTS.rglob("*.py") if p.name.startswith(("test_", "_")) and p.name != "__init__.py"
    )
    assert not [name for name, count in names.items() if count > 1], names.most_common(3)
