"""SWA in any loop: the plain mean of the weights at the window's updates, torch's AveragedModel + update_bn,
an exact resume inside the window, and its arguments."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from emakit.averaging import SWA

BATCHES = 6


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def batch(epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * epoch + index)
    return torch.randn(8, 4, generator=generator) + 1.0, torch.randint(0, 3, (8,), generator=generator)


LOADER = [batch(99, i) for i in range(5)]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, epochs: range) -> Iterator[tuple[int, int]]:
    """SGD with momentum over seeded batches, yielding (epoch, batch) after each optimizer step, then (epoch, -1)."""
    model.train()
    for epoch in epochs:
        for i in range(BATCHES):
            x, y = batch(epoch, i)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            yield epoch, i
        yield epoch, -1


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


@pytest.mark.parametrize(("start", "end", "interval"), [("3ep", "7ep", "1ep"), ("10ba", "0.6dur", "2ba")])
def test_swa_is_the_mean_of_the_weights_at_each_update(start: str, end: str, interval: str) -> None:
    model = make_model()
    swa = SWA(swa_start=start, swa_end=end, update_interval=interval)
    swa.attach(model, max_duration="10ep", batches_per_epoch=BATCHES)
    recorded: list[dict[str, torch.Tensor]] = []
    for _, i in train(model, optimizer_for(model), range(10)):
        changed = swa.step() if i >= 0 else swa.epoch_end()
        if changed:
            recorded.append({n: t.detach().clone() for n, t in model.state_dict().items()})
    assert swa.window_closed and len(recorded) >= 3
    assert swa.n_averaged == len(recorded)
    for name, average in swa.ema_tensors.items():
        if average.is_floating_point():
            expected = torch.stack([r[name].double() for r in recorded]).mean(0).float()
            torch.testing.assert_close(average, expected, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(average, recorded[-1][name]), name  # integer buffers: the last value


def test_swa_updates_only_inside_the_window() -> None:
    model = make_model()
    swa = SWA(swa_start="2ep", swa_end="4ep")
    swa.attach(model)
    opened, closed = [], []
    for epoch, i in train(model, optimizer_for(model), range(1, 7)):
        if i < 0:
            changed = swa.epoch_end()
            (opened if changed else closed).append(epoch)
    assert opened == [2, 3, 4] and closed == [1, 5, 6]
    assert (swa.n_averaged - 1) == 2


def test_swa_and_update_bn_are_torchs_averaged_model_and_update_bn() -> None:
    model = make_model()
    theirs = AveragedModel(model)
    swa = SWA(swa_start="2ep", swa_end="8ep")
    swa.attach(model)
    for _, i in train(model, optimizer_for(model), range(1, 11)):
        if i < 0 and swa.epoch_end():
            theirs.update_parameters(model)
    assert swa.n_averaged == int(theirs.n_averaged) == 7
    update_bn(LOADER, theirs)
    training = {n: t.clone() for n, t in model.state_dict().items()}
    swa.update_bn(LOADER)
    assert all(torch.equal(training[n], t) for n, t in model.state_dict().items())  # training weights untouched
    ours = swa.ema_model.state_dict()
    for name, t in theirs.module.state_dict().items():
        torch.testing.assert_close(ours[name], t, rtol=1e-6, atol=1e-7, msg=name)
    assert torch.equal(ours["1.num_batches_tracked"], torch.tensor(len(LOADER)))
    with swa.average_parameters():  # evaluation sees the averaged weights with the recomputed statistics
        model.eval()
        x = LOADER[0][0]
        torch.testing.assert_close(model(x), theirs.eval()(x), rtol=1e-5, atol=1e-6)


def test_swa_resumes_bitwise_inside_the_window(tmp_path: Any) -> None:
    def run(stop: int | None, resume: Any = None) -> tuple[SWA, nn.Module]:
        model = make_model()
        optimizer = optimizer_for(model)
        swa = SWA(swa_start="5ba", swa_end="40ba", update_interval="1ba")
        swa.attach(model)
        first = 0
        if resume is not None:
            state = torch.load(resume, weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            swa.load_state_dict(state["swa"])
            first = state["epoch"] + 1
        for epoch, i in train(model, optimizer, range(first, 10)):
            if i >= 0:
                swa.step()
            elif epoch == stop:
                path = tmp_path / "ckpt.pt"
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "swa": swa.state_dict(),
                        "epoch": epoch,
                    },
                    path,
                )
                return swa, model
        return swa, model

    whole, _ = run(None)
    cut, _ = run(stop=3)  # batch 24: inside [5, 40]
    assert cut.started and not cut.window_closed
    resumed, _ = run(None, resume=tmp_path / "ckpt.pt")
    assert resumed.window_closed and (resumed.n_averaged - 1) == (whole.n_averaged - 1) == 35
    for name, t in whole.ema_tensors.items():
        assert torch.equal(resumed.ema_tensors[name], t), name


def test_a_closed_window_survives_resume() -> None:
    model = make_model()
    swa = SWA(swa_start="1ep", swa_end="2ep")
    swa.attach(model)
    for _, i in train(model, optimizer_for(model), range(1, 4)):
        if i < 0:
            swa.epoch_end()
    swa.update_bn(LOADER)
    state = copy.deepcopy(swa.state_dict())
    again = SWA(swa_start="1ep", swa_end="2ep")
    again.attach(model)
    again.load_state_dict(state)
    assert again.window_closed and again.bn_updated
    assert not again.epoch_end()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"swa_start": "5ep", "swa_end": "2ep"}, "swa_end='2ep' is before swa_start='5ep'"),
        ({"swa_end": "1.5dur"}, "swa_end in 'dur' must be in"),
        ({"swa_start": "1.5dur"}, "swa_start in 'dur' must be in"),
        ({"swa_start": "-2ep"}, "swa_start"),
        ({"swa_start": "10"}, "swa_start"),
        ({"update_interval": "0.5dur"}, "update_interval"),
        ({"swa_lr": -1.0}, "swa_lr must be"),
        ({"anneal_strategy": "step"}, "anneal_strategy must be 'cos' or 'linear', got 'step'"),
        ({"update_bn": "yes"}, "update_bn must be a bool"),
    ],
)
def test_swa_refuses(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        SWA(**kwargs)


def test_swa_end_in_dur_needs_the_duration() -> None:
    model = make_model()
    swa = SWA(swa_start="1ba", swa_end="0.5dur", update_interval="1ba")
    swa.attach(model)
    with pytest.raises(ValueError, match=r"swa_end='0\.5dur' is a fraction of the training length"):
        swa.step()


def test_before_the_window_there_is_no_average() -> None:
    model = make_model()
    swa = SWA(swa_start="3ep")
    swa.attach(model)
    with pytest.raises(RuntimeError, match=r"the SWA window has not opened yet: .* swa_start='3ep'"):
        swa.update_bn(LOADER)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with swa.average_parameters():  # no average yet: the training weights stay
        assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
