"""Several averages in one EMA (half-life lists, sigma_rel profiles), snapshots and post-hoc reconstruction,
checked against separate single EMAs, the closed-form profile weights and directly tracked averages."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_loader, make_model
from emakit import EMA
from emakit.posthoc import power_weights, read_snapshot_index, reconstruct, sigma_rel_to_gamma


def train(model: nn.Module, emas: list[EMA], steps: int, record: list | None = None, lr: float = 0.05) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batches = list(make_loader(n=8 * 25, seed=3))
    for i in range(steps):
        x, y = batches[i % len(batches)]
        if next(model.parameters()).dtype == torch.bfloat16:
            x = x.to(torch.bfloat16)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
        if record is not None:
            record.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        for ema in emas:
            ema.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flatten", [False, True])
def test_a_list_of_half_lives_equals_separate_emas(dtype: torch.dtype, flatten: bool) -> None:
    model = make_model(0).to(dtype)
    together = EMA(half_life=["3ba", "10ba"], update_interval="2ba", flatten_model=flatten)
    apart = [EMA(half_life="3ba", update_interval="2ba"), EMA(half_life="10ba", update_interval="2ba")]
    for ema in (together, *apart):
        ema.attach(model)
    train(model, [together, *apart], 15)
    assert together.schedule.num_averages == 2 and (together.n_averaged - 1) == (apart[0].n_averaged - 1) == 7
    for j, single in enumerate(apart):
        together.eval_average = j
        for name, value in single.ema_tensors.items():
            torch.testing.assert_close(together.ema_tensors[name], value, rtol=1e-6, atol=1e-7)
    state = together.state_dict()
    assert len(state["more_averages"]) == 1


def test_a_sigma_rel_average_matches_the_closed_form_profile_weights() -> None:
    model = make_model(0)
    ema = EMA(sigma_rel=0.1, update_interval="2ba")
    ema.attach(model)
    records: list[dict[str, torch.Tensor]] = []
    train(model, [ema], 40, record=records)
    # updates happen at steps 1 (the start), 2, 4, ..., 40: 21 in all, the profile runs over updates
    updated = [records[0], *records[1::2]]
    assert ema.n_averaged == len(updated) == 21
    weights = power_weights(len(updated), sigma_rel_to_gamma(0.1))
    assert np.isclose(weights.sum(), 1.0)
    for name, value in ema.ema_tensors.items():
        if not value.is_floating_point():
            continue
        expected = sum(float(w) * r[name].double() for w, r in zip(weights, updated, strict=True))
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_eval_average_chooses_what_is_evaluated_and_published() -> None:
    model = make_model(0)
    ema = EMA(sigma_rel=[0.05, 0.2], eval_average=1)
    ema.attach(model)
    train(model, [ema], 10)
    with ema.average_parameters():
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    chosen = ema.ema_tensors
    for name, value in chosen.items():
        assert torch.equal(inside[name], value.to(inside[name].dtype))
    ema.eval_average = 0
    assert not torch.equal(ema.ema_tensors["fc1.weight"], chosen["fc1.weight"])


def test_snapshots_are_written_every_interval_with_their_time(tmp_path: Path) -> None:
    model = make_model(0)
    ema = EMA(sigma_rel=[0.05, 0.1], update_interval="2ba", snapshot_interval="6ba", snapshot_folder=tmp_path)
    ema.attach(model)
    train(model, [ema], 24)
    infos = read_snapshot_index(tmp_path)
    assert [i.index for i in infos] == [0, 1, 2, 3]
    assert [i.step for i in infos] == [6, 12, 18, 24]
    assert [i.t for i in infos] == [4, 7, 10, 13]  # updates at steps 1 (the start), 2, 4, ...: t = 1 + step / 2
    assert infos[-1].update_interval == 2
    last = reconstruct(tmp_path, sigma_rel=0.1, t=13)  # a tracked profile at a snapshot time is that snapshot
    for name, value in ema.state_dict()["more_averages"][0].items():
        torch.testing.assert_close(last[name], value.to(last[name].dtype), rtol=1e-5, atol=1e-6)


def test_reconstruction_matches_a_directly_tracked_average_on_a_real_run(tmp_path: Path) -> None:
    model = make_model(0)
    tracked = EMA(sigma_rel=[0.05, 0.10], snapshot_interval="20ba", snapshot_folder=tmp_path)
    direct = EMA(sigma_rel=0.07)
    for ema in (tracked, direct):
        ema.attach(model)
    train(model, [tracked, direct], 480, lr=0.02)
    assert len(read_snapshot_index(tmp_path)) == 24
    rebuilt = reconstruct(tmp_path, sigma_rel=0.07)
    a, b = tracked.state_dict()["ema"], tracked.state_dict()["more_averages"][0]
    names = [n for n, v in direct.ema_tensors.items() if v.is_floating_point()]
    error = torch.cat([(rebuilt[n] - direct.ema_tensors[n]).flatten() for n in names]).norm()
    spread = torch.cat([(a[n] - b[n]).flatten() for n in names]).norm()
    print(f"reconstruction error / distance between the tracked averages: {float(error / spread):.4%}")
    assert error <= 0.01 * spread


def test_snapshots_resume_without_gap_or_duplicate(tmp_path: Path) -> None:
    def fresh(folder: Path) -> tuple[nn.Module, EMA]:
        model = make_model(0)
        ema = EMA(half_life=["2ba", "8ba"], snapshot_interval="3ba", snapshot_folder=folder)
        ema.attach(model)
        return model, ema

    whole_model, whole = fresh(tmp_path / "whole")
    opt = torch.optim.SGD(whole_model.parameters(), lr=0.05)
    batches = list(make_loader(n=8 * 25, seed=3))

    def run(model: nn.Module, ema: EMA, opt: torch.optim.Optimizer, steps: range) -> None:
        for i in steps:
            x, y = batches[i]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            ema.step()

    run(whole_model, whole, opt, range(20))

    model, ema = fresh(tmp_path / "resumed")
    opt2 = torch.optim.SGD(model.parameters(), lr=0.05)
    run(model, ema, opt2, range(10))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt2.state_dict(), "ema": ema.state_dict()})
    run(model, ema, opt2, range(10, 14))  # snapshot at step 12 written, then a crash at step 14
    assert len(read_snapshot_index(tmp_path / "resumed")) == 4
    model, ema = fresh(tmp_path / "resumed")
    model.load_state_dict(saved["model"])
    opt2 = torch.optim.SGD(model.parameters(), lr=0.05)
    opt2.load_state_dict(saved["opt"])
    with pytest.warns(UserWarning, match=r"the 1 snapshot\(s\) .* moved aside"):
        ema.load_state_dict(saved["ema"])  # moves the snapshot of step 12 aside: its updates are redone
    assert len(read_snapshot_index(tmp_path / "resumed")) == 3
    run(model, ema, opt2, range(10, 20))

    got, expected = read_snapshot_index(tmp_path / "resumed"), read_snapshot_index(tmp_path / "whole")
    assert [(i.index, i.step, i.t) for i in got] == [(i.index, i.step, i.t) for i in expected]
    assert len(got) == 6
    for index in range(6):
        for j in (0, 1):
            from safetensors.torch import load_file

            a = load_file(str(tmp_path / "resumed" / f"snapshot-{index:06d}.safetensors"))
            b = load_file(str(tmp_path / "whole" / f"snapshot-{index:06d}.safetensors"))
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), (index, j, key)


def test_fp16_snapshots_halve_the_disk(tmp_path: Path) -> None:
    model = nn.Linear(256, 256)
    sizes = {}
    for dtype in (torch.float32, torch.float16):
        ema = EMA(sigma_rel=0.1, snapshot_interval="1ba", snapshot_folder=tmp_path / str(dtype), snapshot_dtype=dtype)
        ema.attach(model)
        ema.step()
        sizes[dtype] = sum(p.stat().st_size for p in (tmp_path / str(dtype)).iterdir())
    assert sizes[torch.float16] < 0.75 * sizes[torch.float32]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sigma_rel": 0.3}, ValueError, r"sigma_rel must be a real number in \(0, 1/sqrt\(12\) = 0.288675\], got 0.3"),
        ({"sigma_rel": 0.1, "half_life": "10ba"}, ValueError, r"exactly one of half_life, smoothing and sigma_rel"),
        ({"sigma_rel": []}, ValueError, r"sigma_rel must be a number or a non-empty list of numbers, got \[\]"),
        ({"half_life": ["2ba", "1ep"]}, ValueError, r"every half-life needs the same unit, got '2ba' and '1ep'"),
        ({"snapshot_interval": "10ba"}, ValueError, r"give snapshot_interval and snapshot_folder together"),
        (
            {"snapshot_interval": "3ba", "snapshot_folder": "s", "update_interval": "2ba"},
            ValueError,
            r"snapshot_interval must be a positive multiple of update_interval='2ba', got '3ba'",
        ),
        ({"snapshot_interval": "1ep", "snapshot_folder": "s"}, ValueError, r"snapshot_interval: got '1ep'; accepted"),
        ({"sigma_rel": [0.05, 0.1], "overlap": True}, ValueError, r"overlap=True works with one average, got 2"),
        ({"sigma_rel": [0.05, 0.1], "eval_average": 2}, ValueError, r"eval_average must be an index into the 2"),
        ({"snapshot_dtype": torch.int8}, ValueError, r"snapshot_dtype must be one of torch.float32"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        EMA(**kwargs)


def test_resuming_with_another_number_of_averages_is_refused() -> None:
    model = make_model(0)
    ema = EMA(sigma_rel=[0.05, 0.1])
    ema.attach(model)
    ema.step()
    other = EMA(sigma_rel=0.05)
    other.attach(model)
    with pytest.raises(ValueError, match=r"EMA state holds 2 average\(s\), this EMA tracks 1"):
        other.load_state_dict(ema.state_dict())


def test_ema_model_follows_a_change_of_eval_average() -> None:
    model = make_model(0)
    ema = EMA(sigma_rel=[0.05, 0.2])
    ema.attach(model)
    train(model, [ema], 10)
    first = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    ema.eval_average = 1
    for name, value in ema.ema_model.state_dict().items():
        assert torch.equal(value, ema.ema_tensors[name])
    assert not torch.equal(first["fc1.weight"], ema.ema_model.fc1.weight)
    with pytest.raises(ValueError, match=r"eval_average must be an index into the 2 tracked average\(s\), got 5"):
        ema.eval_average = 5


@pytest.mark.parametrize("flatten", [False, True])
def test_one_prepared_blend_is_kept_and_follows_repointed_and_replaced_parameters(flatten: bool) -> None:
    # The averages are blended over lists prepared once (a flattened model's flat spans, or every tensor) and
    # kept from update to update; a parameter re-pointed (param.data = ...) or replaced must still be followed.
    model = make_model(0)
    together = EMA(sigma_rel=[0.05, 0.1, 0.2], flatten_model=flatten)
    apart = [EMA(sigma_rel=s) for s in (0.05, 0.1, 0.2)]
    for ema in (together, *apart):
        ema.attach(model)
    train(model, [together, *apart], 6)
    prepared = together._averages.prepared
    assert prepared is not None, "the several averages did not take the prepared path"
    train(model, [together, *apart], 4)
    assert together._averages.prepared is prepared, "the prepared blend was rebuilt although nothing moved"
    model.fc1.weight.data = model.fc1.weight.detach().clone() * 0.5
    train(model, [together, *apart], 5)
    model.fc1.bias = nn.Parameter(model.fc1.bias.detach() + 1.0)
    train(model, [together, *apart], 5)
    for j, single in enumerate(apart):
        together.eval_average = j
        for name, value in single.ema_tensors.items():
            torch.testing.assert_close(together.ema_tensors[name], value, rtol=1e-6, atol=1e-7)
