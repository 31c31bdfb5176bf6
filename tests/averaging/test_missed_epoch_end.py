"""An ``'ep'`` schedule in a loop that never calls ``epoch_end()`` (issue #32 item 10): it would never start or
update. Told how many steps an epoch has, ``step()`` refuses the step that runs past an epoch with no epoch end;
not told, the first verb that needs the average says that no epoch has ended."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emakit import EMA
from emakit.averaging import SWA


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


@pytest.mark.parametrize(
    "averager",
    [
        lambda: EMA(half_life="2ep", update_interval="1ep"),
        lambda: EMA(half_life="4ba", ema_start="1ep"),
        lambda: SWA(swa_start="1ep", swa_end="3ep", update_interval="1ep"),
    ],
)
def test_a_step_past_an_epoch_with_no_epoch_end_is_refused(averager) -> None:
    averager = averager()
    averager.attach(make_model(), batches_per_epoch=3)
    for _ in range(3):
        averager.step()
    with pytest.raises(
        RuntimeError,
        match=r"step\(\) counted 3 optimizer steps since the last epoch end, and "
        r"batches_per_epoch=3: .*'ep'.* call .*epoch_end\(\) after each epoch",
    ) as info:
        averager.step()
    assert "'1ep'" in str(info.value)
    assert averager.timestamp.batch == 3  # the refused step was not counted


def test_a_loop_that_calls_epoch_end_is_never_refused() -> None:
    ema = EMA(half_life="2ep", update_interval="1ep")
    ema.attach(make_model(), batches_per_epoch=3)
    for _ in range(4):
        for _ in range(3):
            ema.step()
        ema.epoch_end()
    assert ema.n_averaged == 4


def test_batch_units_need_no_epoch_end() -> None:
    ema = EMA(half_life="2ba")
    ema.attach(make_model(), batches_per_epoch=3)
    for _ in range(10):
        ema.step()
    assert ema.n_averaged == 10


def test_without_batches_per_epoch_the_first_verb_needing_the_average_says_no_epoch_ended() -> None:
    ema = EMA(half_life="2ep", update_interval="1ep")
    ema.attach(make_model())
    for _ in range(20):
        ema.step()
    with pytest.raises(
        RuntimeError,
        match=r"20 optimizer steps were counted and no epoch_end\(\): .*'ep'.* call "
        r".*epoch_end\(\) after each epoch",
    ):
        _ = ema.ema_model
    fresh = EMA(half_life="2ep", update_interval="1ep")
    fresh.attach(make_model())
    with pytest.raises(RuntimeError) as info:  # nothing counted yet: no word of epoch_end
        _ = fresh.ema_model
    assert "no epoch_end" not in str(info.value)
