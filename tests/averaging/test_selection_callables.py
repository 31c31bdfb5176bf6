"""A ``params`` callable that fails or answers oddly is named with the parameter it was asked about (issue #32
item 16): its own exception with context, a wrong number of arguments, a tensor of several values; numpy's bool
is a bool."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from emakit import EMA


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def started(params) -> EMA:
    ema = EMA(half_life="2ba", params=params)
    ema.attach(make_net())
    ema.step()
    return ema


def test_an_exception_inside_the_callable_names_the_parameter() -> None:
    table = {"0.weight": True}
    with pytest.raises(
        KeyError, match=r"params: the callable raised KeyError\('0\.bias'\) for the parameter '0\.bias'"
    ) as info:
        started(lambda name, tensor: table[name])
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize("params", [lambda name: True, lambda name, tensor, extra: True])
def test_a_callable_of_the_wrong_arity_is_refused_in_the_constructor(params) -> None:
    with pytest.raises(
        TypeError,
        match=r"params: the callable must take two arguments \(name, tensor\), got one of signature \((name|name, tensor, extra)\)",
    ):
        EMA(half_life="2ba", params=params)


def test_a_tensor_answer_of_several_values_is_refused() -> None:
    with pytest.raises(
        TypeError, match=r"params: the callable must return a bool .* got a tensor of shape \(4, 3\) for '0\.weight'"
    ):
        started(lambda name, tensor: tensor > 0)


def test_numpy_and_one_element_tensor_answers_are_bools() -> None:
    by_numpy = started(lambda name, tensor: np.bool_(name.startswith("0.")))
    by_tensor = started(lambda name, tensor: torch.tensor(name.startswith("0.")))
    assert sorted(by_numpy.ema_tensors) == sorted(by_tensor.ema_tensors) == ["0.bias", "0.weight"]


def test_other_answers_still_name_what_is_accepted() -> None:
    with pytest.raises(TypeError, match=r"params: the callable must return a bool .* got 'yes' for '0\.weight'"):
        started(lambda name, tensor: "yes")
