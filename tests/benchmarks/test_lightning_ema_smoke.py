"""``benchmarks/lightning_ema.py --quick`` fits every configuration on both shapes and prints its tables.

Timings are printed, never asserted; what is asserted is that the script still runs against the models
``emakit.bench`` builds (its inputs must fit them) and prints one parseable row per configuration.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("lightning")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lightning_ema.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lightning_ema_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lightning_ema_bench"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_fits_every_configuration_on_both_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script()
    assert bench.main(["--quick", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    titles = re.findall(r"^== EMA cost per optimizer step in a Lightning fit, (\w+):", out, re.M)
    assert titles == ["resnet", "many"]
    for name in bench.CONFIGS:
        rows = re.findall(rf"^{re.escape(name)}\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)\s+([\d.]+)$", out, re.M)
        assert len(rows) == 2, name  # one per shape
        for step, hook, _, _ in rows:
            assert float(step) > 0, name
            assert (float(hook) > 0) == (name != "no EMA"), name


def test_inputs_fit_the_benchmark_models() -> None:
    """Each shape's inputs go through its model: the many-small-tensors model reads 15 features."""
    bench = load_script()
    for shape in ("resnet", "many"):
        model = bench.build_model(shape, quick=True)
        (batch,) = bench.inputs(model, quick=True, count=2)[:2]
        assert model(batch).shape[0] == 2, shape
