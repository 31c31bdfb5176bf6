"""Tests that run the documentation's code as written (a package, so tests/algorithms can import ``_blocks``)."""
