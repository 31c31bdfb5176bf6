"""compute_ema's checks (issue #32 item 19): a meta-device side, a 16-bit average, a 0-d tensor smoothing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from emakit import compute_ema


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_an_average_on_the_meta_device_is_refused() -> None:
    model = make_model()
    with torch.device("meta"):
        on_meta = make_model()
    with pytest.raises(ValueError, match=r"ema_model: tensor '0\.weight' is on the meta device"):
        compute_ema(model, on_meta, smoothing=0.9)
    with pytest.raises(ValueError, match=r"model: tensor '0\.weight' is on the meta device"):
        compute_ema(on_meta, make_model(1), smoothing=0.9)


def test_an_fp16_average_of_an_fp32_model_warns_and_an_fp32_one_does_not() -> None:
    model = make_model()
    with pytest.warns(
        UserWarning, match=r"ema_model keeps torch\.float16 tensors for the model's torch\.float32"
    ) as seen:
        compute_ema(model, copy.deepcopy(model).half(), smoothing=0.9)
    assert seen[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_ema(model, copy.deepcopy(model), smoothing=0.999)
        bf16 = copy.deepcopy(model).bfloat16()
        compute_ema(bf16, copy.deepcopy(bf16), smoothing=0.9)  # the model's own dtype, 1 - smoothing above eps


def test_a_16_bit_average_whose_updates_round_away_warns() -> None:
    """The same stall the EMA warns of with fp32_ema=False: 1 - smoothing below the dtype's resolution."""
    bf16 = make_model().bfloat16()
    average = copy.deepcopy(bf16)
    with pytest.warns(UserWarning, match=r"resolution is 0\.0078.*1 - smoothing = 0\.0001 is below it") as seen:
        compute_ema(bf16, average, smoothing=0.9999)
    assert seen[0].filename == __file__
    with pytest.warns(UserWarning, match=r"1 - smoothing = 0\.0001 is below it") as seen:
        compute_ema(bf16, average, smoothing=0.9999)  # the kept pairing's path says it too
    assert seen[0].filename == __file__


def test_a_0d_floating_tensor_smoothing_is_its_float() -> None:
    model, by_float, by_tensor = make_model(0), make_model(1), make_model(1)
    compute_ema(model, by_float, smoothing=0.75)
    compute_ema(model, by_tensor, smoothing=torch.tensor(0.75))  # type: ignore[arg-type]
    for (name, a), b in zip(by_float.state_dict().items(), by_tensor.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(by_float[0].weight, make_model(1)[0].weight)


@pytest.mark.parametrize(
    "bad, shown",
    [(torch.tensor([0.9, 0.9]), r"shape \(2,\) and dtype torch\.float32"), (torch.tensor(1), r"dtype torch\.int64")],
)
def test_a_tensor_smoothing_of_more_values_or_an_integer_dtype_is_refused(bad: torch.Tensor, shown: str) -> None:
    with pytest.raises(
        ValueError, match=r"smoothing must be a Python float or a 0-d floating tensor in \[0, 1\].*" + shown
    ):
        compute_ema(make_model(0), make_model(1), smoothing=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"smoothing must be a real number in \[0, 1\], got tensor\(1\.5000\)"):
        compute_ema(make_model(0), make_model(1), smoothing=torch.tensor(1.5))  # type: ignore[arg-type]
