"""The shape docs/design.md promises: one averager, schedules handed to it, adapters that hold it.

- ``emakit.EMA`` and ``emakit.SWA`` are the averaging package's classes, final subclasses of the abstract
  ``Averager`` that define only ``__init__`` and ``__repr__`` (they never override a concrete method).
- Every adapter accepts every averager; the callbacks' signatures are the averagers' plus their own.
- No module is only a re-export of another, no module is over 500 lines, and the adapters need no
  ``type: ignore[attr-defined]`` to reach into an averager.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import emakit
import emakit.averaging
from emakit.averaging import BEMA, EMA, SWA, Averager
from emakit.averaging.schedules import (
    BiasCorrected,
    Constant,
    EqualWeights,
    GrowingHalfLife,
    PerAmount,
    Power,
    Schedule,
)

PACKAGE = Path(emakit.__file__).parent
#: Modules whose job is to be a namespace users import from (package faces define nothing by design).
NAMESPACES = {PACKAGE / "distributed.py"}


def test_the_public_classes_are_the_averaging_packages() -> None:
    assert emakit.EMA is emakit.averaging.EMA and emakit.SWA is emakit.averaging.SWA
    assert inspect.isabstract(Averager)
    with pytest.raises(TypeError):
        Averager()  # type: ignore[abstract]


@pytest.mark.parametrize("cls", [EMA, SWA, BEMA])
def test_each_averager_only_configures_the_one_averager(cls: type) -> None:
    assert cls.__bases__ == (Averager,)
    # what Python itself puts in a class's namespace; copyreg adds __slotnames__ the first time an object is copied
    implicit = {"__module__", "__doc__", "__qualname__", "__final__", "__abstractmethods__", "_abc_impl"}
    implicit |= {"__firstlineno__", "__static_attributes__", "__slotnames__"}
    assert set(cls.__dict__) - implicit == {"__init__", "__repr__"}


@pytest.mark.parametrize("schedule", [Constant, Power, EqualWeights, GrowingHalfLife, BiasCorrected, PerAmount])
def test_schedules_are_final_and_override_no_concrete_method(schedule: type) -> None:
    assert schedule.__bases__ == (Schedule,)

    def abstract(value: object) -> bool:
        target = value.fget if isinstance(value, property) else value
        return bool(getattr(target, "__isabstractmethod__", False))

    members = vars(Schedule).items()
    concrete = {
        name for name, value in members if (callable(value) or isinstance(value, property)) and not abstract(value)
    }
    overridden = {name for name in vars(schedule) if name in concrete and not name.startswith("__")}
    assert not overridden, overridden


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "egg-info" not in str(p))


def test_no_module_is_only_a_re_export() -> None:
    offenders = []
    for path in _modules():
        if path.name == "__init__.py" or path in NAMESPACES:
            continue
        body = ast.parse(path.read_text()).body
        defines = [
            node
            for node in body
            if not isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr))
            and not (isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["__all__"])
        ]
        if not defines:
            offenders.append(str(path.relative_to(PACKAGE)))
    assert not offenders, f"modules that only re-export: {offenders}"


def test_no_module_is_over_500_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_adapters_need_no_attr_defined_ignores() -> None:
    found = [str(p) for p in _modules() if "type: ignore[attr-defined]" in p.read_text() and "algorithms" in p.parts]
    assert not found, found


def test_the_trainer_wraps_every_averager() -> None:
    from conftest import make_loader, make_model
    from emakit import Trainer
    from emakit.algorithms import Averaging

    for averager in (EMA(half_life="2ba"), SWA(swa_start="1ba", update_interval="1ba")):
        trainer = Trainer(make_model(), make_loader(n=16), "3ba", algorithms=[averager], progress_bar=False)
        (algorithm,) = trainer.state.algorithms
        assert isinstance(algorithm, Averaging) and algorithm.averager is averager
        assert algorithm.name == type(averager).__name__  # the checkpoint key of the averager's state
        trainer.fit()
        assert averager.started


@pytest.mark.parametrize("framework", ["lightning", "transformers"])
@pytest.mark.parametrize("averager", [EMA, SWA])
def test_each_callback_takes_its_averagers_arguments_then_its_own(framework: str, averager: type) -> None:
    pytest.importorskip(framework)
    module = __import__(f"emakit.integrations.{framework}", fromlist=["x"])
    callback = getattr(module, f"{averager.__name__}Callback")
    mine = list(inspect.signature(callback).parameters.values())
    theirs = list(inspect.signature(averager).parameters.values())
    assert mine[: len(theirs)] == theirs
    assert all(p.kind is p.KEYWORD_ONLY for p in mine[len(theirs) :])
    assert isinstance(callback().averager, averager)
