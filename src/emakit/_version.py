"""emakit's version: the one place it is written.

pyproject.toml reads it statically (setuptools parses this file without importing emakit or torch), and
``emakit.__version__`` re-exports it.
"""

__version__ = "0.1.0"
