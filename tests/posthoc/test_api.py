"""The package's public names resolve (lazily) to the modules' objects."""

from __future__ import annotations

import importlib

import pytest

import emakit.posthoc as posthoc


@pytest.mark.parametrize("name", posthoc.__all__)
def test_public_names_resolve(name: str) -> None:
    value = getattr(posthoc, name)
    module = importlib.import_module(posthoc._LAZY.get(name, "emakit.posthoc"))  # constants live in the package
    assert value is getattr(module, name)
    assert name in dir(posthoc)


def test_reconstruct_is_the_function_even_after_its_module_is_imported() -> None:
    importlib.import_module("emakit.posthoc.reconstruction")
    assert callable(posthoc.reconstruct) and posthoc.reconstruct.__module__ == "emakit.posthoc.reconstruction"


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match=r"module 'emakit\.posthoc' has no attribute 'nope'"):
        posthoc.nope  # noqa: B018
