"""Adapters that drive :class:`emakit.EMA` from other training frameworks.

Each submodule imports its framework when it is imported, never before: ``import emakit`` imports none of
them. Install the matching extra first, e.g. ``pip install "emakit[lightning]"``.
"""
