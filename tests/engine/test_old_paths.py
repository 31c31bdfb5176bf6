"""The engine's modules under their paths from before emakit.engine existed: the same objects, and the old CLI."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

OLD_PATHS = {
    "emakit.storage": "emakit.engine.storage",
    "emakit.flatten": "emakit.engine.flatten",
    "emakit.overlap": "emakit.engine.overlap",
    "emakit.posthoc.kernels": "emakit.engine.blend",
}
FUNCTIONAL_NAMES = {
    "UpdatePlan": "emakit.engine.plan",
    "canonical_name": "emakit.engine.naming",
    "copy_tensors_": "emakit.engine.kernels",
    "is_averaged": "emakit.engine.naming",
    "lerp_flat_": "emakit.engine.kernels",
    "lerp_tensors_": "emakit.engine.kernels",
    "named_tensors": "emakit.engine.naming",
    "registration_count": "emakit.engine.registry",
    "tensor_slots": "emakit.engine.naming",
    "unwrap_model": "emakit.engine.naming",
    "validate_smoothing": "emakit.engine.kernels",
    "Slot": "emakit.engine.naming",
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_module_re_exports_the_engine_objects(old: str) -> None:
    module = importlib.import_module(old)
    assert module.__all__
    for name in module.__all__:
        if name == "main":  # the blend timing, kept under its old name
            assert module.main is importlib.import_module("emakit.engine.blend_timing").main
            continue
        assert getattr(module, name) is getattr(importlib.import_module(OLD_PATHS[old]), name), name


def test_functional_keeps_its_names() -> None:
    import emakit.functional as ef
    from emakit.engine.pairing import kept_plan

    for name, home in FUNCTIONAL_NAMES.items():
        assert getattr(ef, name) is getattr(importlib.import_module(home), name), name
    assert set(ef.__all__) == {*FUNCTIONAL_NAMES, "compute_ema"} - {"Slot"}
    assert ef._kept_plan is kept_plan


def test_engine_package_names_resolve_lazily() -> None:
    import emakit.engine as engine

    for name in engine.__all__:
        assert getattr(engine, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        engine.nope  # noqa: B018


@pytest.mark.parametrize("module", ["emakit.posthoc.kernels", "emakit.engine.blend_timing"])
def test_blend_timing_help_prints_options_without_timing(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True, timeout=120
    )
    assert f"python -m {module}" in result.stdout
    for option in ("--numel", "--repeats", "--threads"):
        assert option in result.stdout
    assert "ratios to it" not in result.stdout  # the help, not a timing run


def test_blend_timing_rejects_a_bad_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "emakit.posthoc.kernels", "--repeats", "0"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "--repeats: must be a positive integer, got '0'" in result.stderr
