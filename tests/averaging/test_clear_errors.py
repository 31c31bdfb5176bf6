"""Clear errors and warnings instead of raw ones or silence (issue #21): the snapshot folder checked at attach,
an fp16 overflow that does not end the run, and arguments or states that cannot work, each named."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import make_loader, make_model
from emakit import EMA
from emakit.posthoc import read_snapshot_index


def steps(model: nn.Module, ema: EMA, n: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in list(make_loader(n=8 * n, seed=1))[:n]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y).backward()
        opt.step()
        ema.step()


# ---------------------------------------------------------------------------------------------- 4. snapshots
def test_a_snapshot_folder_under_a_file_is_refused_at_attach(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    folder = tmp_path / "a_file" / "snapshots"
    ema = EMA(sigma_rel=[0.05, 0.1], snapshot_interval="10ba", snapshot_folder=folder)
    with pytest.raises(ValueError, match=re.escape(f"snapshot_folder {str(folder)!r} is not a writable folder: Not a")):
        ema.attach(make_model(0))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_snapshot_folder_is_refused_at_attach(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="is not a writable folder"):
            EMA(sigma_rel=0.1, snapshot_interval="1ba", snapshot_folder=tmp_path / "s").attach(make_model(0))
    finally:
        tmp_path.chmod(0o700)


def test_a_weight_beyond_float16_writes_that_snapshot_in_float32_and_warns_once(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    ema = EMA(sigma_rel=[0.05, 0.1], snapshot_interval="1ba", snapshot_folder=tmp_path, snapshot_dtype=torch.float16)
    ema.attach(model)
    ema.step()  # snapshot 0, in range: float16
    with torch.no_grad():
        model.weight[0, 0] = 1e6  # beyond float16's 65504
    with pytest.warns(UserWarning, match=r"snapshot 1 .* is written in float32, not snapshot_dtype=torch.float16"):
        ema.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema.step()  # overflows again: float32 again, silently
        with torch.no_grad():
            model.weight.fill_(0.5)
        for _ in range(30):  # the average comes back within float16's range
            ema.step()
    infos = read_snapshot_index(tmp_path)
    assert [i.dtype for i in infos[:3]] == ["float16", "float32", "float32"] and infos[-1].dtype == "float16"
    stored = load_file(infos[1].path)["0/weight"]
    assert stored.dtype == torch.float32 and torch.isfinite(stored).all() and stored.max() > 65504


# ---------------------------------------------------------------------------------------------- 6. unclear errors
def test_a_submodule_replaced_with_another_shape_is_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    ema = EMA(half_life="4ba")
    ema.attach(model)
    ema.step()
    ema.step()
    model[1] = nn.Linear(4, 3)
    with pytest.raises(RuntimeError, match=r"tracked tensor '1.weight' now has shape \(3, 4\), \(2, 4\) when the EMA"):
        ema.step()


def test_a_sigma_rel_state_in_a_half_life_ema_is_refused_naming_both() -> None:
    model = make_model(0)
    power = EMA(sigma_rel=0.1)
    power.attach(model)
    power.step()
    constant = EMA(half_life="10ba")
    constant.attach(model)
    with pytest.raises(
        ValueError,
        match=r"saved by an EMA with sigma_rel power profiles.*power\(sigma_rel=0.1.*this EMA has smoothing=0.933",
    ):
        constant.load_state_dict(power.state_dict())
    assert not constant.started
    constant.step()
    with pytest.raises(
        ValueError, match=r"saved by an EMA with smoothing=0.933.*this EMA has sigma_rel power profiles"
    ):
        power.load_state_dict(constant.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma_rel": [0.05, 0.05]}, r"sigma_rel: every average needs its own value, got \[0.05, 0.05\]"),
        ({"half_life": ["10ba", "10 ba"]}, r"half_life: every average needs its own value, got \['10ba', '10ba'\]"),
        ({"smoothing": torch.ones(2) * 0.9}, r"smoothing must be a Python float or a 0-d floating tensor"),
    ],
)
def test_duplicate_profiles_and_tensor_smoothings_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EMA(**kwargs)


def test_a_0d_tensor_smoothing_is_its_float() -> None:
    assert EMA(smoothing=torch.tensor(0.9)).schedule.smoothing == pytest.approx(0.9)
    assert isinstance(EMA(smoothing=torch.tensor(0.9, dtype=torch.float64)).schedule.smoothing, float)


def test_smoothing_one_warns_that_the_average_never_moves() -> None:
    with pytest.warns(UserWarning, match=r"smoothing=1.0 keeps the average at its first value forever"):
        ema = EMA(smoothing=1.0)
    model = make_model(0)
    ema.attach(model)
    steps(model, ema, 1)  # the average starts as a copy of the weights
    first = {k: v.clone() for k, v in ema.ema_tensors.items()}
    steps(model, ema, 3)
    assert all(torch.equal(v, first[k]) for k, v in ema.ema_tensors.items() if v.is_floating_point())


def test_a_16_bit_average_that_rounds_its_updates_away_warns() -> None:
    model = make_model(0).to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"fp32_ema=False keeps the average in the model's torch.bfloat16, whose res"):
        EMA(half_life="1000ba", fp32_ema=False).attach(model)
    with pytest.warns(UserWarning, match="sigma_rel average's coefficient"):
        EMA(sigma_rel=0.1, fp32_ema=False).attach(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EMA(half_life="1000ba").attach(model)  # fp32 master: fine
        EMA(half_life="10ba", fp32_ema=False).attach(model)  # 1 - smoothing = 0.067 > 2**-7
        EMA(half_life="1000ba", fp32_ema=False).attach(make_model(0))  # float32 model
    # the warning is true: next to the same EMA with an fp32 master, the 16-bit one hardly moves
    low, master = EMA(half_life="1000ba", fp32_ema=False), EMA(half_life="1000ba")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low.attach(model)
    master.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i, (x, y) in enumerate(make_loader(n=8 * 50, seed=1)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
        opt.step()
        low.step()
        master.step()
        if i == 0:
            start = {k: v.float().clone() for k, v in master.ema_tensors.items()}
    moved_low = low.ema_tensors["fc1.weight"].float() - start["fc1.weight"]
    moved = master.ema_tensors["fc1.weight"] - start["fc1.weight"]
    assert moved.norm() > 0 and (moved_low - moved).norm() > 0.5 * moved.norm()
