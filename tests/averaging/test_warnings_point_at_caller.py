"""The EMA's warnings name the user's line, not emakit's: the warning's file is the caller's.

A warning filter by module, or the ``file:line`` a user reads, depends on it; the EMA is split into parts,
so each warning's ``stacklevel`` must count the frames the call really goes through.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from emakit.averaging import EMA


def _stepped(ema: EMA, steps: int) -> EMA:
    model = nn.Linear(3, 2)
    ema.attach(model)
    for _ in range(steps):
        with torch.no_grad():
            model.weight.add_(0.1)
        ema.step()
    return ema


def test_a_long_update_interval_warns_at_the_constructor_call() -> None:
    with pytest.warns(UserWarning, match="barely smooths") as record:
        EMA(half_life="2ba", update_interval="4ba")
    assert [Path(w.filename) for w in record] == [Path(__file__)]


def test_a_different_smoothing_on_resume_warns_at_load_state_dict() -> None:
    state = _stepped(EMA(half_life="10ba"), 3).state_dict()
    other = EMA(half_life="20ba")
    other.attach(nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="resuming an EMA saved with smoothing") as record:
        other.load_state_dict(state)
    assert [Path(w.filename) for w in record] == [Path(__file__)]
    assert (other.n_averaged - 1) == 2  # the warning does not stop the resume


def test_a_snapshot_count_disagreeing_with_the_state_warns_at_load_state_dict(tmp_path: Path) -> None:
    ema = _stepped(EMA(half_life="10ba", snapshot_interval="1ba", snapshot_folder=tmp_path), 4)
    state = ema.state_dict()
    assert state["snapshot_index"] == 4
    state["snapshot_index"] = 2  # the folder holds 4 snapshots up to the resumed point
    resumed = EMA(half_life="10ba", snapshot_interval="1ba", snapshot_folder=tmp_path)
    resumed.attach(nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="continuing at 4") as record:
        resumed.load_state_dict(state)
    assert [Path(w.filename) for w in record] == [Path(__file__)]
    assert resumed.state_dict()["snapshot_index"] == 4
