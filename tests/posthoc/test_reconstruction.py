"""Reconstruction from snapshot folders: exactness at snapshots, streaming, a real training run, bad targets."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from emakit.engine.blend import blend_averages_
from emakit.posthoc.profiles import HalfLifeProfile, PowerProfile, solve_coefficients
from emakit.posthoc.reconstruction import RECONSTRUCTION_METADATA_KEY, plan_reconstruction, reconstruct
from emakit.posthoc.snapshots import next_snapshot_index, read_snapshot_index, write_snapshot

TRACKED = (0.05, 0.10)  # the snapshots' averages
DIRECT_SIGMA_REL = 0.07  # tracked directly as well, to compare with its reconstruction
DIRECT_HALF_LIFE = 70.0  # a classic EMA tracked directly (EMA updates)
UPDATES = 1000
SNAPSHOTS = 20


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    names = [n for n in a if a[n].is_floating_point()]
    return float(sum(((a[n].double() - b[n].double()) ** 2).sum() for n in names) ** 0.5)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small real training run: an MLP with BatchNorm trained by noisy SGD; the averages are updated after every
    step with blend_averages_ and the power schedule; 20 snapshots of the 0.05 and 0.10 averages are written."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("snapshots")
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(512, 8)
    y = torch.sin(x @ torch.randn(8, 1))
    profiles: list[PowerProfile | HalfLifeProfile] = [
        *(PowerProfile.from_sigma_rel(s) for s in (*TRACKED, DIRECT_SIGMA_REL)),
        HalfLifeProfile(DIRECT_HALF_LIFE),
    ]
    state = model.state_dict(keep_vars=True)
    names = list(state)
    sources = [state[n].detach() for n in names]
    averages = [[torch.empty_like(s) for s in sources] for _ in profiles]
    for t in range(1, UPDATES + 1):
        batch = torch.randint(0, len(x), (16,))
        loss = nn.functional.mse_loss(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        blend_averages_(averages, sources, [1.0 - p.beta(t) for p in profiles])
        if t % (UPDATES // SNAPSHOTS) == 0:
            tracked = [dict(zip(names, a, strict=True)) for a in averages[: len(TRACKED)]]
            write_snapshot(folder, next_snapshot_index(folder), tracked, profiles[: len(TRACKED)], t=t, step=t)
    final = [{n: tensor.clone() for n, tensor in zip(names, a, strict=True)} for a in averages]
    return {"folder": folder, "final": final, "names": names}


def test_reconstruction_equals_a_directly_tracked_average(run: dict[str, Any]) -> None:
    got = reconstruct(run["folder"], sigma_rel=DIRECT_SIGMA_REL)
    s05, s10, direct = run["final"][:3]
    error = distance(got, direct) / distance(s05, s10)
    print(
        f"\nsigma_rel {DIRECT_SIGMA_REL} from {SNAPSHOTS} snapshots of {TRACKED}, {UPDATES} updates: error "
        f"{100 * error:.3f}% of the distance between the tracked averages"
    )
    assert error <= 0.01
    assert torch.equal(got["1.num_batches_tracked"], direct["1.num_batches_tracked"])


def test_half_life_reconstruction_equals_a_directly_tracked_classic_ema(run: dict[str, Any]) -> None:
    got = reconstruct(run["folder"], half_life=DIRECT_HALF_LIFE)
    s05, s10, _, direct = run["final"]
    error = distance(got, direct) / distance(s05, s10)
    print(
        f"\nhalf-life {DIRECT_HALF_LIFE:g} updates: error {100 * error:.3f}% of the distance between the tracked averages"
    )
    assert error <= 0.01


@pytest.mark.parametrize("j", [0, 1])
@pytest.mark.parametrize("at", [5, 12, 20])
def test_a_tracked_profile_at_a_snapshot_time_returns_that_snapshot(run: dict[str, Any], j: int, at: int) -> None:
    index = read_snapshot_index(run["folder"])
    info = index[at - 1]
    got = reconstruct(run["folder"], sigma_rel=TRACKED[j], t=info.t)
    expected = load_file(info.path)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[f"{j}/{name}"], rtol=1e-6, atol=1e-7)


def test_result_is_the_planned_sum_of_snapshots(run: dict[str, Any]) -> None:
    plan = plan_reconstruction(run["folder"], sigma_rel=0.08, t=800)
    index = read_snapshot_index(run["folder"])
    sources = [(p, s.t) for s in index for p in s.profiles]
    x = solve_coefficients(sources, PowerProfile.from_sigma_rel(0.08), 800)
    assert [c for _, _, c in plan.terms] == [c for c in x if c != 0.0]
    assert all(info.t <= 800 for info, _, _ in plan.terms) and plan.latest.t == 800
    expected: dict[str, torch.Tensor] = {}
    for info, j, c in plan.terms:
        for key, tensor in load_file(info.path).items():
            head, name = key.split("/", 1)
            if int(head) == j and tensor.is_floating_point():
                expected[name] = expected.get(name, torch.zeros_like(tensor, dtype=torch.float64)) + c * tensor.double()
    got = reconstruct(run["folder"], sigma_rel=0.08, t=800, dtype=torch.float32)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor.float(), rtol=1e-6, atol=1e-7)


def test_streaming_in_small_batches_gives_the_same_result_and_writes_out(run: dict[str, Any], tmp_path: Path) -> None:
    whole = reconstruct(run["folder"], sigma_rel=0.07)
    out = tmp_path / "ema.safetensors"
    streamed = reconstruct(run["folder"], sigma_rel=0.07, out=out, batch_bytes=64)
    assert list(streamed) == list(whole) == run["names"]
    for name in whole:
        assert torch.equal(streamed[name], whole[name]), name
    on_disk = load_file(out)
    assert all(torch.equal(on_disk[n], whole[n]) for n in whole)
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()[RECONSTRUCTION_METADATA_KEY])
    assert meta["t"] == UPDATES and meta["target"]["kind"] == "power" and meta["snapshots_used"] > 2
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 1))
    model.load_state_dict(on_disk)  # canonical names: loads into the plain model


def test_low_precision_output(run: dict[str, Any]) -> None:
    half = reconstruct(run["folder"], sigma_rel=0.07, dtype=torch.bfloat16)
    full = reconstruct(run["folder"], sigma_rel=0.07)
    assert half["0.weight"].dtype == torch.bfloat16
    assert torch.equal(half["0.weight"], full["0.weight"].to(torch.bfloat16))


def test_a_target_between_snapshots_uses_only_earlier_ones(run: dict[str, Any]) -> None:
    plan = plan_reconstruction(run["folder"], sigma_rel=0.07, t=730)
    assert max(info.t for info, _, _ in plan.terms) == 700
    assert plan.latest.t == 700
    assert np.isfinite(plan.fit_error)


# ---------------------------------------------------------------------------------------------- bad targets
def test_a_target_after_the_last_snapshot_names_it(run: dict[str, Any]) -> None:
    last = read_snapshot_index(run["folder"])[-1].path
    with pytest.raises(ValueError, match=re.escape(f"t={UPDATES + 1} is after the last snapshot, {str(last)!r}")):
        reconstruct(run["folder"], sigma_rel=0.07, t=UPDATES + 1)


def test_a_target_before_the_first_snapshot_names_it(run: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"t=10 is before the first snapshot, .*snapshot-000000.safetensors' \(t=50\)"):
        reconstruct(run["folder"], sigma_rel=0.07, t=10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"give exactly one of sigma_rel, half_life, window and kernel .* got sigma_rel=None, half_life=None"),
        ({"sigma_rel": 0.07, "half_life": 10}, r"give exactly one of sigma_rel, half_life, window and kernel"),
        ({"sigma_rel": 0.29}, r"sigma_rel must be a real number in \(0, 1/sqrt\(12\) = 0.288675\], got 0.29"),
        ({"sigma_rel": 0.0}, r"sigma_rel must be a real number in \(0, 1/sqrt\(12\)"),
        ({"half_life": -1}, r"half_life must be a finite real number greater than 0, got -1"),
        ({"sigma_rel": 0.07, "t": 0}, r"t must be an integer >= 1 \(EMA updates\), got 0"),
        ({"sigma_rel": 0.07, "t": 12.5}, r"t must be an integer >= 1"),
        ({"sigma_rel": 0.07, "dtype": torch.int32}, r"dtype must be one of torch.float32, torch.float16"),
    ],
)
def test_bad_targets_name_the_argument(run: dict[str, Any], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        reconstruct(run["folder"], **kwargs)


def test_an_empty_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"snapshot folder {str(tmp_path)!r} holds no snapshots")):
        reconstruct(tmp_path, sigma_rel=0.07)
