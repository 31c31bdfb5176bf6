"""Every front end accepts every averager, and EMA and SWA accept and refuse the same things there.

The four repros of the one-averager issue: ``prepare_ema`` refused ``emakit.averaging.EMA`` and every SWA;
SWA's errors spoke of ``ema_start``; ``Trainer(algorithms=[SWA, SWA])`` said "EMA and SWA do not compose";
the Transformers ``SWACallback(swa_start="5sp")`` never opened while ``EMACallback`` refused ``'sp'``.
"""

from __future__ import annotations

import pytest
from torch import nn

import emakit.averaging
from conftest import make_loader, make_model
from emakit import EMA, SWA, Trainer


def test_swa_messages_name_swa_start_and_the_window() -> None:
    swa = SWA(swa_start="3ba", update_interval="1ba")
    swa.attach(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"the SWA window has not opened yet: .*swa_start='3ba'") as caught:
        _ = swa.ema_model
    assert "ema_start" not in str(caught.value) and "EMA" not in str(caught.value)
    with pytest.raises(ValueError, match=r"swa_start='0.5dur' is a fraction of the training length, which this SWA"):
        half = SWA(swa_start="0.5dur", update_interval="1ba")
        half.attach(nn.Linear(2, 2))
        half.step()


def test_two_swas_in_a_trainer_are_refused_as_two_of_one_kind() -> None:
    with pytest.raises(ValueError, match=r"^one SWA per Trainer: .*got algorithms SWA and SWA") as caught:
        Trainer(make_model(), make_loader(), "1ep", algorithms=[SWA(), SWA()], progress_bar=False)
    assert "do not compose" not in str(caught.value)


@pytest.mark.parametrize("make", [lambda: SWA(swa_start="5sp", update_interval="1ba"), lambda: EMA(ema_start="5sp")])
def test_a_start_in_samples_needs_the_samples_in_any_loop(make) -> None:  # type: ignore[no-untyped-def]
    averager = make()
    averager.attach(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"needs the samples of each step: call step\(num_samples=\.\.\.\)"):
        averager.step()
    assert averager.step(num_samples=4) is False and averager.step(num_samples=4)  # 8 samples >= 5: started


@pytest.mark.parametrize("name", ["EMACallback", "SWACallback"])
def test_the_transformers_callbacks_refuse_sample_times_alike(name: str) -> None:
    transformers = pytest.importorskip("emakit.integrations.transformers")
    argument = "ema_start" if name == "EMACallback" else "swa_start"
    with pytest.raises(ValueError, match=rf"{argument}='5sp': the Trainer does not report how many samples"):
        getattr(transformers, name)(**{argument: "5sp"})


@pytest.mark.parametrize(
    ("make", "models"),
    [
        (lambda: emakit.averaging.EMA(half_life="4ba"), 3),  # steps 1, 2, 3
        (lambda: SWA(swa_start="2ba", update_interval="1ba"), 2),  # steps 2, 3
    ],
)
def test_prepare_ema_takes_any_averager(make, models: int) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from emakit.integrations.accelerate import prepare_ema

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(make_model())
    averager = prepare_ema(accelerator, model, make())
    assert averager.follows(model)
    for _ in range(3):
        averager.step()
    assert averager.started and averager.n_averaged == models
