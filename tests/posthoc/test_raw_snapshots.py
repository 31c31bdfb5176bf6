"""Snapshots that hold the raw training weights (``EMA(snapshot_raw=True)``): what they hold and cost on disk, old
folders still read, BEMA's output rebuilt post hoc against a float64 oracle of the recorded weights and against
emakit's online BEMA on the same run, and the refusals of the targets that need raw weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _runs import noisy_mlp
from _runs import probe as probe_run
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from emakit import BEMA, EMA
from emakit.posthoc.profiles import SIGMA_REL_MAX
from emakit.posthoc.reconstruction import plan_reconstruction, reconstruct
from emakit.posthoc.snapshots import METADATA_KEY, read_snapshot_index, write_snapshot
from emakit.posthoc.targets import bema_kernel, parse_kernel
from emakit.safetensors_file import tensor_entries, write_safetensors

UPDATES = 240
EVERY = 12  # 20 snapshots
TRACKED = (0.05, 0.10, SIGMA_REL_MAX)
LEGACY = Path(__file__).resolve().parents[1] / "data" / "snapshots-v1"
#: (rho, gamma, kappa, eta): the paper's defaults, a faster EMA with a stronger correction, no correction, no EMA
BEMAS = [(10.0, 1.0, 0.5, 0.2), (1.0, 2.0, 0.7, 0.1), (10.0, 1.0, 0.5, 50.0), (5.0, 1.0, 0.0, 0.3)]
FLOAT32 = 1e-6  # the snapshots hold float32: a floor under any measured error


def bema_oracle(rho: float, gamma: float, kappa: float, eta: float, t: int) -> np.ndarray:
    """BEMA's output as weights of the updates 1..t, run in float64 from the paper's recursion over unit impulses:
    the EMA starts as theta_0 (update 1), then ``ema += beta (theta - ema)`` with ``beta = (rho + gamma s) ** -kappa``
    at ``s = 1, 2, ...`` steps; the output adds ``alpha (theta_t - theta_0)``, ``alpha = (rho + gamma s) ** -eta``."""
    ema = np.zeros(t)
    ema[0] = 1.0
    for n in range(2, t + 1):
        beta = (rho + gamma * (n - 1)) ** -kappa
        ema *= 1.0 - beta
        ema[n - 1] += beta
    out = ema.copy()
    alpha = (rho + gamma * (t - 1)) ** -eta
    out[t - 1] += alpha
    out[0] -= alpha
    return out


def record(model: nn.Module, folder: Path, step: Any, bema: tuple[float, ...] = BEMAS[0]) -> dict[str, Any]:
    """Run ``step(update)`` UPDATES times with an EMA snapshotting TRACKED and the raw weights every EVERY updates,
    and emakit's online BEMA beside it; record the weights after every update (float64) and BEMA's output."""
    ema = EMA(sigma_rel=list(TRACKED), snapshot_interval=f"{EVERY}ba", snapshot_folder=folder, snapshot_raw=True)
    online = BEMA(*bema, update_interval="1ba")
    ema.attach(model)
    online.attach(model)
    recorded = []
    for k in range(1, UPDATES + 1):
        step(k)
        ema.step()
        online.step()
        recorded.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    with online.average_parameters():
        output = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    return {"recorded": recorded, "bema": output}


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A model of one parameter that holds e_k after update k: an average of it is the weight of each update."""
    folder = tmp_path_factory.mktemp("probe")
    model, step = probe_run(UPDATES)
    return folder, record(model, folder, step)


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A tiny MLP trained by noisy SGD, with the paper's BEMA online beside the snapshots."""
    folder = tmp_path_factory.mktemp("training")
    model, step = noisy_mlp()
    return folder, record(model, folder, step)


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[n].double() - b[n].double()) ** 2).sum() for n in b) ** 0.5)


def weighted(recorded: list[dict[str, torch.Tensor]], w: np.ndarray) -> dict[str, torch.Tensor]:
    return {n: sum(float(c) * r[n] for c, r in zip(w, recorded, strict=True)) for n in recorded[0]}  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- the format
def test_raw_snapshots_hold_the_training_weights_and_the_first_theta_0(
    training: tuple[Path, dict[str, Any]],
) -> None:
    folder, run = training
    index = read_snapshot_index(folder)
    assert [info.t for info in index] == list(range(EVERY, UPDATES + 1, EVERY))
    assert all(info.raw for info in index) and [info.start for info in index] == [True] + [False] * (len(index) - 1)
    assert all(info.metadata["format_version"] == 2 for info in index)
    for info in index:
        tensors = load_file(info.path)
        for name, expected in run["recorded"][info.t - 1].items():
            torch.testing.assert_close(tensors[f"raw/{name}"].double(), expected, rtol=1e-7, atol=1e-7)
    first = load_file(index[0].path)
    for name, expected in run["recorded"][0].items():  # theta_0: the weights the averages started from
        torch.testing.assert_close(first[f"start/{name}"].double(), expected, rtol=1e-7, atol=1e-7)


def test_the_disk_cost_of_raw_weights_is_one_model_per_snapshot(tmp_path: Path) -> None:
    """Measured: the same run written with and without raw weights; each snapshot grows by the model's bytes in the
    snapshot dtype (plus a few header bytes), the first by twice that (theta_0)."""
    sizes = {}
    for raw, dtype in [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16), (True, torch.bfloat16)]:
        torch.manual_seed(0)
        model = nn.Linear(64, 32)
        folder = tmp_path / f"{raw}-{dtype}"
        ema = EMA(
            sigma_rel=[0.05, 0.1],
            snapshot_interval="5ba",
            snapshot_folder=folder,
            snapshot_dtype=dtype,
            snapshot_raw=raw,
        )
        ema.attach(model)
        for _ in range(15):
            with torch.no_grad():
                model.weight.add_(0.01)
            ema.step()
        sizes[raw, dtype] = [info.path.stat().st_size for info in read_snapshot_index(folder)]
    for dtype in (torch.float32, torch.bfloat16):
        model_bytes = (64 * 32 + 32) * dtype.itemsize
        grown = [a - b for a, b in zip(sizes[True, dtype], sizes[False, dtype], strict=True)]
        print(f"\n{dtype}: model {model_bytes} B; snapshot {sizes[False, dtype][1]} B, with raw weights +{grown[1]} B")
        assert 0 <= grown[0] - 2 * model_bytes <= 512 and all(0 <= g - model_bytes <= 256 for g in grown[1:])


def test_snapshots_without_raw_weights_stay_version_1(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    ema = EMA(sigma_rel=0.1, snapshot_interval="2ba", snapshot_folder=tmp_path)
    ema.attach(model)
    for _ in range(4):
        ema.step()
    for info in read_snapshot_index(tmp_path):
        with safe_open(str(info.path), framework="pt") as f:
            assert '"format_version": 1' in f.metadata()[METADATA_KEY] and not any("raw" in k for k in f.keys())  # noqa: SIM118
        assert not info.raw and not info.start


def test_a_folder_written_before_raw_weights_still_reads_and_reconstructs() -> None:
    index = read_snapshot_index(LEGACY / "run")
    assert [info.t for info in index] == [4, 8, 12] and not any(info.raw or info.start for info in index)
    assert all(info.metadata["format_version"] == 1 for info in index)
    last = load_file(index[-1].path)
    got = reconstruct(LEGACY / "run", sigma_rel=0.2)  # a tracked profile at a snapshot's t: the stored average
    for name in ("weight", "bias"):
        torch.testing.assert_close(got[name], last[f"1/{name}"])


# ---------------------------------------------------------------------------------------------- BEMA's kernel
@pytest.mark.parametrize("params", BEMAS)
@pytest.mark.parametrize("t", [UPDATES, 120])
def test_the_reported_bema_fit_error_is_the_true_error_of_the_weights_given_to_each_update(
    params: tuple[float, ...], t: int, probe: tuple[Path, dict[str, Any]]
) -> None:
    folder, _ = probe
    spec = f"bema:{','.join(map(str, params))}"
    expected = bema_oracle(*params, t)
    plan = plan_reconstruction(folder, kernel=spec, t=t)
    got = reconstruct(folder, kernel=spec, t=t)["w"].double().numpy()[:t]
    true = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    print(f"\n{spec:<22} t={t}  reported fit error {plan.fit_error:.3e}   true error {true:.3e}")
    assert true <= 2 * plan.fit_error + FLOAT32
    assert plan.fit_error <= 2 * true + FLOAT32
    read = {(info.t, j) for info, j, _ in plan.terms if isinstance(j, str)}  # raw weights up to t join the fit
    assert {(t, "raw"), (EVERY, "start")} <= read and all(t_i <= t for t_i, _ in read)


def test_bema_rebuilt_from_a_training_run_is_the_oracle_and_the_online_bema_within_its_fit_error(
    training: tuple[Path, dict[str, Any]],
) -> None:
    """``rebuilt - oracle = sum_k d_k theta_k`` with ``sum_k d_k = 0`` and ``||d|| <= fit error x ||w||``, so
    ``||rebuilt - oracle|| <= fit error x ||w|| x sqrt(sum_k ||theta_k - mean||^2)`` (Cauchy-Schwarz). The online
    BEMA (emakit's averager, another implementation) is compared with the same bound."""
    folder, run = training
    recorded = run["recorded"]
    w = bema_oracle(*BEMAS[0], UPDATES)
    oracle = weighted(recorded, w)
    mean = weighted(recorded, np.full(UPDATES, 1 / UPDATES))
    spread = math.sqrt(sum(distance(r, mean) ** 2 for r in recorded))
    plan = plan_reconstruction(folder, kernel="bema")
    got = reconstruct(folder, kernel="bema")
    bound = plan.fit_error * float(np.linalg.norm(w)) * spread
    size = distance(oracle, {n: torch.zeros_like(v) for n, v in oracle.items()})
    print(
        f"\nbema fit error {plan.fit_error:.3e}: |rebuilt - oracle| {distance(got, oracle):.3e}, "
        f"|rebuilt - online BEMA| {distance(got, run['bema']):.3e}, bound {bound:.3e}"
    )
    assert distance(run["bema"], oracle) <= FLOAT32 * size  # the online BEMA is the oracle's recursion
    assert distance(got, oracle) <= bound + FLOAT32 * size
    assert distance(got, run["bema"]) <= bound + 2 * FLOAT32 * size
    assert 0 < plan.fit_error < 0.01


def test_the_raw_target_is_the_raw_weights(training: tuple[Path, dict[str, Any]]) -> None:
    folder, run = training
    plan = plan_reconstruction(folder, kernel="raw", t=120)
    assert plan.fit_error == 0.0 and [(info.t, j, c) for info, j, c in plan.terms] == [(120, "raw", 1.0)]
    got = reconstruct(folder, kernel="raw", t=120)
    assert distance(got, run["recorded"][119]) <= FLOAT32 * distance(got, {n: 0 * v for n, v in got.items()})


def test_bema_weights_match_the_oracle_for_any_update_interval() -> None:
    for phi in (1, 3, 400):
        w = bema_kernel(10.0, 1.0, 0.5, 0.2).weights(50, phi)
        oracle = bema_oracle(10.0, float(phi), 0.5, 0.2, 50)  # gamma * s with s in steps = (gamma phi) * updates
        np.testing.assert_allclose(w, oracle, rtol=1e-12, atol=1e-15)
        assert math.isclose(w.sum(), 1.0, rel_tol=1e-12)


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("spec", ["bema", "raw", "bema:1,1,0.5,0.2"])
def test_targets_of_the_raw_weights_are_refused_from_snapshots_without_them(spec: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"kernel {spec.split(':')[0]}.* weighs the raw training weights, which the snapshots in .*snapshots-v1"
        r".* do not hold \(written without them\): write them with EMA\(\.\.\., snapshot_raw=True\)",
    ):
        plan_reconstruction(LEGACY / "run", kernel=spec)


def test_targets_of_the_raw_weights_need_a_snapshot_at_t_and_theta_0(
    probe: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    folder, _ = probe
    with pytest.raises(ValueError, match=r"kernel raw at t=125: no snapshot in .* holds the raw weights after update "):
        plan_reconstruction(folder, kernel="raw", t=125)
    partial = tmp_path / "no-theta-0"
    partial.mkdir()
    for info in read_snapshot_index(folder)[1:3]:  # a series whose first snapshot is lost
        shutil.copy(info.path, partial / info.path.name)
    assert plan_reconstruction(partial, kernel="raw").fit_error == 0.0
    with pytest.raises(ValueError, match=r"kernel bema:10.0,1.0,0.5,0.2 needs theta_0, the weights at the start"):
        plan_reconstruction(partial, kernel="bema")


def test_raw_weights_are_checked_when_written(tmp_path: Path) -> None:
    average = {"w": torch.zeros(3)}
    args: dict[str, Any] = dict(index=0, averages=[average], profiles=[{"kind": "power", "gamma": 7.0}], t=1, step=1)
    with pytest.raises(ValueError, match=r"raw must be a dict of the training weights .* differs in 'v'"):
        write_snapshot(tmp_path, raw={"v": torch.zeros(3)}, **args)
    with pytest.raises(ValueError, match=r"start\['w'\] must be a tensor of shape \(3,\), got \(2,\)"):
        write_snapshot(tmp_path, start={"w": torch.zeros(2)}, **args)
    with pytest.raises(ValueError, match=r"snapshot_raw=True writes the raw weights into the snapshots: give snapshot"):
        EMA(sigma_rel=0.1, snapshot_raw=True)
    with pytest.raises(TypeError, match=r"snapshot_raw must be a bool, got 1"):
        EMA(sigma_rel=0.1, snapshot_raw=1, snapshot_folder=tmp_path, snapshot_interval="1ba")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bema:1,2", r"kernel bema: RHO,GAMMA,KAPPA,ETA must be numbers \(BEMA's output .*\), got 'bema:1,2'"),
        ("bema:1,x,0.5,0.2", r"kernel bema: RHO,GAMMA,KAPPA,ETA must be numbers"),
        ("bema:-1,1,0.5,0.2", r"kernel bema: BEMA's output \(each finite and >= 0.*got 'bema:-1,1,0.5,0.2'"),
        ("raw:1", r"kernel raw takes no parameter \(the raw training weights at t"),
        ("cosine", r"kernel must be NAME:VALUE with NAME one of cosine:F; .*; bema:RHO,GAMMA,KAPPA,ETA; raw, got"),
    ],
)
def test_the_raw_kernels_parse_and_name_what_they_accept(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_kernel(text)


def test_bema_refuses_a_first_update_weighing_more_than_one(probe: tuple[Path, dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match=r"kernel bema:0.0,0.5,0.5,0.2: rho \+ gamma \* update_interval must be 1"):
        plan_reconstruction(probe[0], kernel="bema:0,0.5,0.5,0.2")


def test_the_page_quotes_the_bema_fit_errors(probe: tuple[Path, dict[str, Any]]) -> None:
    """docs/posthoc.md's BEMA table: the fit error of each parameter set at t=240 on these snapshots."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "posthoc.md").read_text().splitlines()
    for params in BEMAS:
        spec = "bema:" + ",".join(f"{p:g}" for p in params)
        error = plan_reconstruction(probe[0], kernel=spec).fit_error
        shown = "exact" if error < 1e-12 else f"{100 * error:.2g}%"
        rows = [line for line in page if line.startswith(f"| `{spec}`")]
        assert len(rows) == 1 and rows[0].endswith(f"| {shown} |"), (spec, shown, rows)


def test_a_snapshot_of_an_unknown_version_or_raw_weights_in_version_1_is_refused(tmp_path: Path) -> None:
    source = read_snapshot_index(LEGACY / "run")[0]
    tensors = load_file(source.path)
    for version, extra, message in [
        (3, {}, r"snapshot-000000.safetensors' has format_version 3; this emakit reads 1 and 2"),
        (1, {"raw/bias": tensors["0/bias"]}, r"holds a tensor 'raw/bias' that belongs to no average \(0..1\)"),
        (2, {"raw/bias": tensors["0/bias"]}, r"averages 0 and raw hold different tensors \(e.g. 'weight'\)"),
    ]:
        folder = tmp_path / f"v{version}-{len(extra)}"
        folder.mkdir()
        metadata = {**source.metadata, "format_version": version}
        write_safetensors(
            tensor_entries([*tensors.items(), *extra.items()]),
            folder / source.path.name,
            metadata={METADATA_KEY: json.dumps(metadata)},
            overwrite=False,
        )
        with pytest.raises(ValueError, match=message):
            read_snapshot_index(folder)


def test_the_cli_lists_which_snapshots_hold_raw_weights(
    training: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    from emakit.posthoc.cli import main

    assert main([str(training[0]), "--list"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("snapshot-")]
    assert len(lines) == UPDATES // EVERY and lines[0].endswith("float32 + raw weights + theta_0")
    assert all(line.endswith("float32 + raw weights") for line in lines[1:])
    assert main([str(LEGACY / "run"), "--list"]) == 0
    assert "raw weights" not in capsys.readouterr().out


def test_theta_0_survives_a_resume_before_the_first_snapshot(tmp_path: Path) -> None:
    """The copy of theta_0 kept until the first snapshot is in the state: a run resumed before that snapshot
    writes the same first snapshot (theta_0 included) as the uninterrupted run."""

    def run(folder: Path, resume_at: int | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ema = EMA(half_life="3ba", snapshot_folder=folder, snapshot_interval="5ba", snapshot_raw=True)
        ema.attach(model)
        data = torch.randn(6, 8, 4)
        for step in range(6):
            if step == resume_at:  # a fresh process: new model, optimizer and EMA from the saved states
                saved = torch.load(folder.parent / "state.pt", weights_only=True)
                model = nn.Linear(4, 3)
                model.load_state_dict(saved["model"])
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                opt.load_state_dict(saved["opt"])
                ema = EMA(half_life="3ba", snapshot_folder=folder, snapshot_interval="5ba", snapshot_raw=True)
                ema.attach(model)
                ema.load_state_dict(saved["ema"])
            opt.zero_grad()
            model(data[step]).square().mean().backward()
            opt.step()
            ema.step()
            if step == 2:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()},
                           folder.parent / "state.pt")  # fmt: skip
        return load_file(read_snapshot_index(folder)[0].path)

    whole = run(tmp_path / "a" / "snaps", None)
    resumed = run(tmp_path / "b" / "snaps", 3)
    assert any(key.startswith("start/") for key in whole)
    assert whole.keys() == resumed.keys()
    for key, tensor in whole.items():
        assert torch.equal(resumed[key], tensor), key
