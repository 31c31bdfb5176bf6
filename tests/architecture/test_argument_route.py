"""Where the Lightning callback's ``half_life`` and ``params`` go, followed at run time (argument_route.py).

The weight of every update is the schedule's answer, reached from the averager's tick through the averager's
own parts only; the selection is handed to the tracked-set owner when the callback is built.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from argument_route import follow, returns, stays

import emakit

SRC = Path(emakit.__file__).resolve().parents[1]  # the emakit this process imports
#: The modules that handle the half-life between a tick and the blend: the averager, its schedule and what the
#: schedule keeps besides n (time.py, the clock's units, aside).
DECIDING = {"averager.py", "schedules.py", "rulestate.py"}


def test_each_updates_weight_comes_from_the_schedule_through_the_averager_alone() -> None:
    route = follow("half_life", SRC)
    first_fit = route.calls[: route.calls.index(("resume", "", ""))]
    steps = [i for i, (_, _, function) in enumerate(first_fit) if function == "Averager.tick"]
    assert len(steps) == 5
    updates = 0
    for begin, end in zip(steps, [*steps[1:], len(first_fit)], strict=True):
        block = first_fit[begin:end]
        functions = [function for _, _, function in block]
        if "Averages.blend" not in functions:
            continue
        updates += 1
        before_blend = block[: functions.index("Averages.blend")]
        assert any(
            module == "emakit/averaging/schedules.py" and f.endswith(".weights") for _, module, f in before_blend
        )
        handled = {module.removeprefix("emakit/averaging/") for _, module, _ in before_blend} - {"emakit/time.py"}
        assert handled <= DECIDING, handled
    assert updates == 3  # steps 3, 4 and 5: the average started as a copy at step 2


def test_params_goes_to_the_tracked_set_owner_when_the_callback_is_built() -> None:
    route = follow("params", SRC)
    built = stays([module for event, module, _ in route.calls if event == "construct"][:5])
    assert built == [
        "emakit/integrations/lightning.py",
        "emakit/averaging/ema.py",
        "emakit/averaging/selection.py",
        "emakit/averaging/averager.py",
        "emakit/averaging/tracked.py",
    ]
    assert returns(built) == 0
