"""Non-finite values that the model and the average share (a causal mask of -inf registered as a buffer) stay
what they are: ``lerp(-inf, -inf, w)`` is NaN, so a plain blend would poison the average. Checked against a
float64 EMA of the recorded weights, in which ``s * -inf + (1 - s) * -inf`` is -inf."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from emakit import EMA, compute_ema

T, D = 4, 6


class Causal(nn.Module):
    """One attention-like layer with a causal mask buffer of -inf above the diagonal."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(D, D)
        self.register_buffer("mask", torch.full((T, T), float("-inf")).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        scores = h @ h.transpose(-1, -2) / D**0.5 + self.mask
        return scores.softmax(-1) @ h


def train(model: nn.Module, steps: int, after_step, records: list) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(3, T, D, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        records.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        after_step()


def reference(records: list[dict[str, torch.Tensor]], smoothing: float) -> dict[str, torch.Tensor]:
    average = {k: v.double() for k, v in records[0].items()}
    for weights in records[1:]:
        for k, v in weights.items():
            average[k] = smoothing * average[k] + (1 - smoothing) * v.double()
    return average


def check(average: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
    assert torch.equal(average["mask"], mask)  # bitwise what it was
    assert not average["mask"].isnan().any()
    for k, v in expected.items():
        torch.testing.assert_close(average[k].double(), v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_a_constant_minus_inf_buffer_stays_and_the_rest_matches_the_reference(
    flatten: bool, overlap: bool, skip_nonfinite: bool
) -> None:
    model = Causal()
    mask = model.mask.clone()
    ema = EMA(smoothing=0.7, flatten_model=flatten, overlap=overlap, skip_nonfinite=skip_nonfinite)
    ema.attach(model)
    records: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no update may be skipped: the mask is not a diverged weight
        train(model, 6, ema.step, records)
    assert ema.started and (ema.n_averaged - 1) == 5 and ema.num_skipped_nonfinite == 0
    check(ema.ema_tensors, reference(records, 0.7), mask)
    assert torch.equal(ema.ema_model.mask, mask)
    with ema.average_parameters():
        out = model(torch.randn(2, T, D))
    assert out.isfinite().all()


def test_several_averages_keep_the_mask() -> None:
    model = Causal()
    mask = model.mask.clone()
    ema = EMA(half_life=["2ba", "5ba"])
    ema.attach(model)
    records: list = []
    train(model, 5, ema.step, records)
    for j, half_life in enumerate((2, 5)):
        ema.eval_average = j
        average = ema.ema_tensors
        check(average, reference(records, 2 ** (-1 / half_life)), mask)


def test_a_new_nan_is_still_skipped_by_the_guard() -> None:
    model = Causal()
    ema = EMA(smoothing=0.5, skip_nonfinite=True)
    ema.attach(model)
    ema.step()
    ema.step()
    with torch.no_grad():
        model.lin.weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="skipped"):
        ema.step()
    with torch.no_grad():
        model.lin.weight[0, 0] = 0.0
        model.mask[0, 0] = float("inf")  # a new Inf in the buffer is not the average's: skipped too
    with pytest.warns(UserWarning, match="skipped"):
        ema.step()
    assert ema.num_skipped_nonfinite == 2 and (ema.n_averaged - 1) == 1


@pytest.mark.parametrize("flatten", [False, True])
def test_compute_ema_keeps_a_constant_minus_inf_buffer(flatten: bool) -> None:
    import copy

    from emakit.engine.flatten import flatten_model_

    model = Causal()
    mask = model.mask.clone()
    ema_model = copy.deepcopy(model)
    if flatten:
        flatten_model_(model)
        flatten_model_(ema_model)
    records: list = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    train(model, 5, lambda: compute_ema(model, ema_model, 0.8), records)
    check(dict(ema_model.state_dict()), reference(records, 0.8), mask)


def test_a_resumed_average_keeps_the_mask_and_matches_the_reference() -> None:
    import copy

    model = Causal()
    mask = model.mask.clone()
    first = EMA(smoothing=0.6)
    first.attach(model)
    records: list = []
    train(model, 3, first.step, records)
    resumed = EMA(smoothing=0.6)
    resumed.attach(model)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    train(model, 3, resumed.step, records)
    check(resumed.ema_tensors, reference(records, 0.6), mask)
