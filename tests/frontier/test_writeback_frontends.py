"""Write-back lives in the averager's step, so every front end gets it: emakit's Trainer and the Lightning callback,
each against a float64 oracle computed from the weights recorded just before the averager ran."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from conftest import make_loader, make_model
from emakit import EMA, Trainer
from emakit.core.algorithm import Algorithm
from emakit.core.callback import Callback
from emakit.core.event import Event

Weights = dict[str, torch.Tensor]
SMOOTHING = 2 ** (-1 / 4)  # half_life='4ba', an update every optimizer step


def floating(model: nn.Module) -> Weights:
    return {n: t.detach().to(torch.float64).clone() for n, t in model.state_dict().items() if t.is_floating_point()}


def expected_run(before: list[Weights], pull: float, epoch_length: int) -> tuple[list[Weights], list[Weights]]:
    """From the weights before each update: the weights after the pull of each step, and after each epoch's copy."""
    average = {n: v.clone() for n, v in before[0].items()}
    pulled, copied = [before[0]], []
    for k in range(1, len(before)):
        average = {n: SMOOTHING * average[n] + (1 - SMOOTHING) * before[k][n] for n in average}
        pulled.append({n: t + pull * (average[n] - t) for n, t in before[k].items()})
        if (k + 1) % epoch_length == 0:
            copied.append({n: a.clone() for n, a in average.items()})
    return pulled, copied


def worst(actual: list[Weights], expected: list[Weights]) -> float:
    assert len(actual) == len(expected)
    return max((a[n] - e[n]).abs().max().item() for a, e in zip(actual, expected, strict=True) for n in e)


class BeforeAveraging(Algorithm):
    """Listed before the averager: the weights at each BATCH_END before the averager runs."""

    def __init__(self) -> None:
        self.before: list[Weights] = []

    def match(self, event: Event, state: Any) -> bool:
        return event == Event.BATCH_END

    def apply(self, event: Event, state: Any, logger: Any) -> None:
        self.before.append(floating(state.model))


class AfterAveraging(Callback):
    """Callbacks run after algorithms: the weights once the averager wrote back, at batch and epoch ends."""

    def __init__(self) -> None:
        self.batch_end: list[Weights] = []
        self.epoch_end: list[Weights] = []

    def run_event(self, event: Event, state: Any, logger: Any) -> None:
        if event == Event.BATCH_END:
            self.batch_end.append(floating(state.model))
        elif event == Event.EPOCH_END:
            self.epoch_end.append(floating(state.model))


def test_emakits_trainer_pulls_every_step_and_copies_at_epoch_ends() -> None:
    model = make_model()
    ema = EMA(half_life="4ba").write_back(every="1ep", pull=0.2)
    before, after = BeforeAveraging(), AfterAveraging()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    Trainer(model, make_loader(n=32), "3ep", algorithms=[before, ema], callbacks=[after], optimizers=optimizer,
            progress_bar=False).fit()  # fmt: skip
    pulled, copied = expected_run(before.before, 0.2, epoch_length=4)
    error = max(worst(after.batch_end, pulled), worst(after.epoch_end, copied))
    print(f"Trainer, pull 0.2 + a copy every epoch: max |weights - oracle| = {error:.2e}")
    assert error < 1e-6
    assert ema.writeback.num_copies == 3 and ema.writeback.num_pulls == 11
    assert worst(after.epoch_end, after.batch_end[3::4]) > 1e-4  # the copies moved the weights


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*")
def test_the_lightning_callback_writes_back_and_resets_lightnings_optimizer() -> None:
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    from emakit.integrations.lightning import EMACallback

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.batch_end: list[Weights] = []
            self.epoch_end: list[Weights] = []
            self.momentum: list[int] = []

        def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
            self.batch_end.append(floating(module))

        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self.epoch_end.append(floating(module))
            self.momentum.append(len(trainer.optimizers[0].state))

    callback = EMACallback(half_life="4ba")
    callback.averager.write_back(every="1ep", pull=0.2, optimizer_state="reset")
    before, after = Record(), Record()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[before, callback, after])  # fmt: skip
    trainer.fit(Net(), make_loader(n=32))
    pulled, copied = expected_run(before.batch_end, 0.2, epoch_length=4)
    error = max(worst(after.batch_end, pulled), worst(after.epoch_end, copied))
    print(f"Lightning, pull 0.2 + a copy every epoch: max |weights - oracle| = {error:.2e}")
    assert error < 1e-6
    assert callback.averager.writeback.num_copies == 3
    # SGD's momentum buffers: one per parameter after the epoch's steps, none left after each copy's reset
    assert before.momentum == [6, 6, 6] and after.momentum == [0, 0, 0]


def test_accelerates_prepared_optimizer_is_found_for_a_reset() -> None:
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from emakit.integrations.accelerate import prepare_ema

    accelerator = Accelerator(cpu=True)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = prepare_ema(accelerator, model, EMA(half_life="4ba").write_back(every="2ba", optimizer_state="reset"))
    sizes = []
    for x, y in make_loader(n=24):
        loss = nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        ema.step()
        sizes.append(sum(len(s) for s in optimizer.optimizer.state.values()))
    # Adam's three entries for each of 6 parameters, dropped at the copies after steps 3 (start 1 + 2)
    assert sizes == [18, 18, 0] and ema.writeback.num_copies == 1
    assert all(torch.equal(p, ema.ema_tensors[n]) for n, p in model.named_parameters())
