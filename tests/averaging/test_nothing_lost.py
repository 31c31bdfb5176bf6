"""Nothing is lost or mixed silently (issue #21, the EMA's part): snapshot folders know their run, a resume
moves the lost future aside instead of deleting it, and training inside ``average_parameters`` is refused."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import make_loader, make_model
from emakit import EMA
from emakit.posthoc import read_snapshot_index, reconstruct
from emakit.posthoc.profiles import PowerProfile
from emakit.posthoc.snapshots import DISCARDED_PREFIX, discard_snapshots_after, write_snapshot

BATCHES = list(make_loader(n=8 * 25, seed=3))


def train(model: nn.Module, ema: EMA, steps: range, opt: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05)
    for i in steps:
        x, y = BATCHES[i % len(BATCHES)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ema.step()
    return opt


def snapshot_ema(folder: Path) -> tuple[nn.Module, EMA]:
    model = make_model(0)
    ema = EMA(sigma_rel=[0.05, 0.1], snapshot_interval="10ba", snapshot_folder=folder)
    ema.attach(model)
    return model, ema


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("snapshot-*"))}


# ---------------------------------------------------------------------------------------------- 1. runs
def test_a_new_run_refuses_a_folder_holding_another_runs_snapshots(tmp_path: Path) -> None:
    model, ema = snapshot_ema(tmp_path)
    train(model, ema, range(60))
    before = files(tmp_path)
    assert len(before) == 6 and len({i.run for i in read_snapshot_index(tmp_path)}) == 1

    model, fresh = snapshot_ema(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"snapshot_folder {str(tmp_path)!r} already holds 6 snapshot(s)")):
        train(model, fresh, range(20))
    assert files(tmp_path) == before  # refused before anything was written
    assert fresh.n_averaged == 0 and not fresh.started


def test_a_folder_mixing_two_runs_is_refused_by_reconstruct_and_the_cli(tmp_path: Path, capsys) -> None:
    from emakit.posthoc.cli import main

    model, ema = snapshot_ema(tmp_path)
    train(model, ema, range(60))
    # what an earlier emakit let happen: a second run overwrote snapshots 0-1 in place
    model, other = snapshot_ema(tmp_path / "other")
    train(model, other, range(20))
    for name in ("snapshot-000000.safetensors", "snapshot-000001.safetensors"):
        (tmp_path / name).write_bytes((tmp_path / "other" / name).read_bytes())
    with pytest.raises(ValueError, match=r"mixes the snapshots of 2 runs \(snapshots 0-1 from run \w+; snapshots 2-5"):
        reconstruct(tmp_path, sigma_rel=0.07)
    assert main([str(tmp_path), "--sigma-rel", "0.07", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "mixes the snapshots of 2 runs" in capsys.readouterr().err
    assert main([str(tmp_path), "--list"]) == 2


def test_a_resumed_run_continues_its_own_series(tmp_path: Path) -> None:
    model, ema = snapshot_ema(tmp_path)
    opt = train(model, ema, range(30))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()})
    model, resumed = snapshot_ema(tmp_path)
    model.load_state_dict(saved["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["ema"])
    train(model, resumed, range(30, 60), opt)
    infos = read_snapshot_index(tmp_path)
    assert [i.index for i in infos] == list(range(6)) and {i.run for i in infos} == {saved["ema"]["snapshot_run"]}


def test_loading_another_runs_state_into_a_folder_is_refused_untouched(tmp_path: Path) -> None:
    model, ema = snapshot_ema(tmp_path / "a")
    train(model, ema, range(30))
    model_b, other = snapshot_ema(tmp_path / "b")
    train(model_b, other, range(10))
    before = files(tmp_path / "a")
    model, resumed = snapshot_ema(tmp_path / "a")
    with pytest.raises(ValueError, match="already holds 3 snapshot"):
        resumed.load_state_dict(other.state_dict())
    assert files(tmp_path / "a") == before and not resumed.started


def test_snapshots_without_a_run_id_are_one_legacy_run(tmp_path: Path) -> None:
    tensors = [{"w": torch.full((2,), float(i))} for i in range(2)]
    profiles = [PowerProfile.from_sigma_rel(0.05), PowerProfile.from_sigma_rel(0.1)]
    for index in range(3):
        write_snapshot(tmp_path, index, tensors, profiles, t=10 * (index + 1), step=10 * (index + 1))
    infos = read_snapshot_index(tmp_path)
    assert [i.run for i in infos] == [None] * 3 and "run" not in infos[0].metadata
    assert torch.allclose(reconstruct(tmp_path, sigma_rel=0.07)["w"], torch.tensor([0.5, 0.5]), atol=0.5)
    # a legacy EMA state (no run id) resumes into its legacy folder and keeps writing without an id
    model_l, legacy = snapshot_ema(tmp_path / "legacy")
    train(model_l, legacy, range(20))
    state = legacy.state_dict()
    del state["snapshot_run"]  # rewrite state and snapshots as an emakit without run ids did
    for info in read_snapshot_index(tmp_path / "legacy"):
        data = load_file(info.path)
        write_snapshot(
            tmp_path / "legacy",
            info.index,
            [{k[2:]: v for k, v in data.items() if k.startswith(f"{j}/")} for j in (0, 1)],
            list(info.profiles),
            t=info.t,
            step=info.step,
            overwrite=True,
        )
    model2, resumed = snapshot_ema(tmp_path / "legacy")
    model2.load_state_dict(model_l.state_dict())
    resumed.load_state_dict(state)
    train(model2, resumed, range(20, 40))
    assert [i.run for i in read_snapshot_index(tmp_path / "legacy")] == [None] * 4


# ---------------------------------------------------------------------------------------------- 2. resume
def test_resuming_before_ema_start_moves_the_snapshots_aside_with_a_warning(tmp_path: Path) -> None:
    model = make_model(0)
    ema = EMA(sigma_rel=[0.05, 0.1], ema_start="5ba", snapshot_interval="10ba", snapshot_folder=tmp_path)
    ema.attach(model)
    early = copy.deepcopy(ema.state_dict())  # before ema_start
    train(model, ema, range(65))
    before = files(tmp_path)
    assert len(before) == 6
    with pytest.warns(UserWarning, match=r"the 6 snapshot\(s\) of snapshot_folder .* moved aside into '.*\.discarded-"):
        ema.load_state_dict(early)
    assert not list(tmp_path.glob("snapshot-*"))
    (aside,) = tmp_path.glob(f"{DISCARDED_PREFIX}*")
    assert {p.name: p.read_bytes() for p in sorted(aside.iterdir())} == before


def test_branching_from_a_mid_run_checkpoint_keeps_the_later_snapshots_aside(tmp_path: Path) -> None:
    model, ema = snapshot_ema(tmp_path)
    opt = train(model, ema, range(30))
    saved = copy.deepcopy({"model": model.state_dict(), "ema": ema.state_dict()})
    train(model, ema, range(30, 60), opt)
    later = {n: b for n, b in files(tmp_path).items() if int(n[9:15]) >= 3}
    model, branch = snapshot_ema(tmp_path)
    model.load_state_dict(saved["model"])
    with pytest.warns(UserWarning, match=r"the 3 snapshot\(s\)"):
        branch.load_state_dict(saved["ema"])
    (aside,) = tmp_path.glob(f"{DISCARDED_PREFIX}*")
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == later
    assert [i.index for i in read_snapshot_index(tmp_path)] == [0, 1, 2]


def test_discard_snapshots_after_moves_not_deletes(tmp_path: Path) -> None:
    model, ema = snapshot_ema(tmp_path)
    train(model, ema, range(40))
    before = files(tmp_path)
    moved = discard_snapshots_after(tmp_path, 25)
    assert [p.name for p in moved] == ["snapshot-000002.safetensors", "snapshot-000003.safetensors"]
    assert all(p.parent.name.startswith(DISCARDED_PREFIX) and p.read_bytes() == before[p.name] for p in moved)
    assert discard_snapshots_after(tmp_path, 25) == []


# ---------------------------------------------------------------------------------------------- 3. eval block
def test_ema_step_inside_average_parameters_is_refused() -> None:
    model = make_model(0)
    ema = EMA(half_life="4ba")
    ema.attach(model)
    train(model, ema, range(3))
    updates = ema.n_averaged - 1
    refused = pytest.raises(RuntimeError, match=r"ema.step\(\) inside `with ema.average_parameters\(\):`")
    with refused, ema.average_parameters():
        ema.step()
    assert (ema.n_averaged - 1) == updates and ema.timestamp.batch == 3 and not ema.ema_weights_active


@pytest.mark.parametrize("flatten", [False, True])
def test_an_optimizer_step_inside_average_parameters_is_an_error_after_restoring(flatten: bool) -> None:
    model = make_model(0)
    ema = EMA(half_life="4ba", flatten_model=flatten)
    ema.attach(model)
    train(model, ema, range(3))
    training = {k: v.clone() for k, v in model.state_dict().items()}
    average = {k: v.clone() for k, v in ema.ema_tensors.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    refused = pytest.raises(RuntimeError, match=r"parameter\(s\) .* were changed in place inside .* are not kept")
    with refused, ema.average_parameters():
        x, y = BATCHES[0]
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, training[k]), k  # the training weights came back
    for k, v in ema.ema_tensors.items():
        assert torch.equal(v, average[k]), k


@pytest.mark.parametrize("flatten", [False, True])
def test_evaluating_inside_average_parameters_raises_nothing(flatten: bool) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = EMA(half_life="4ba", flatten_model=flatten)
    ema.attach(model)
    ema.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ema.average_parameters():
            model(torch.randn(8, 4))  # a train-mode forward moves BatchNorm's buffers, not the parameters
        with ema.average_parameters():
            model.eval()
            model(torch.randn(8, 4))


def test_ema_model_is_live_storage_as_its_docs_say() -> None:
    """docs/guides/own-loop.md: a train-mode forward of ``ema_model`` moves the EMA's BatchNorm statistics."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = EMA(half_life="4ba")
    ema.attach(model)
    ema.step()
    before = ema.ema_tensors["1.running_mean"].clone()
    ema.ema_model(torch.randn(8, 4) + 3)  # eval mode: the statistics are read, not moved
    assert torch.equal(ema.ema_tensors["1.running_mean"], before)
    ema.ema_model.train()(torch.randn(8, 4) + 3)
    assert not torch.equal(ema.ema_tensors["1.running_mean"], before)


def test_two_emas_started_together_on_one_folder_refuse_each_other(tmp_path: Path) -> None:
    """Both check the folder while it is empty; the second to write a snapshot notices the first's and stops."""
    first_model, first = snapshot_ema(tmp_path)
    second_model, second = snapshot_ema(tmp_path)
    first_opt = train(first_model, first, range(5))
    second_opt = train(second_model, second, range(5))  # both checked the folder: still empty
    train(first_model, first, range(5, 10), first_opt)  # writes snapshot 0
    written = files(tmp_path)
    assert list(written) == ["snapshot-000000.safetensors"]
    message = (
        rf"snapshot_folder '{re.escape(str(tmp_path))}' received snapshot 0 from run [0-9a-f]+ while this EMA "
        r"\(run [0-9a-f]+\) wrote there: two EMAs or runs share the folder"
    )
    with pytest.raises(ValueError, match=message):
        train(second_model, second, range(5, 10), second_opt)
    assert files(tmp_path) == written
    assert {info.run for info in read_snapshot_index(tmp_path)} == {first._snapshots.run}
