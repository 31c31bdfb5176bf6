"""Real 2-rank runs (torchrun, gloo, CPU) of the Trainer with DDP and FSDP2, against single-process runs.

One launch of ``_dist_worker.py main`` trains with DDP, with FSDP2, resumes an FSDP run and loads a
single-process checkpoint under DDP; each rank saves what it saw. The tests compare that with runs in
this process that see the same global batches (the same shuffled order, twice the per-rank batch).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist_worker import SEED, Net, eval_history, make_trainer

from conftest import assert_script_finished
from emakit._compat import FSDP2_TORCH, TORCH_VERSION
from emakit.distributed import export_ema_weights, model_weights

WORKER = Path(__file__).with_name("_dist_worker.py")
# One launch trains with DDP and FSDP2 alike; emakit refuses FSDP2 before FSDP2_TORCH (tests/compat checks that).
pytestmark = pytest.mark.skipif(
    TORCH_VERSION < FSDP2_TORCH, reason=f"emakit shards with FSDP2 from torch {FSDP2_TORCH} on, not {torch.__version__}"
)
LAUNCH_TIMEOUT_S = 300
FP32 = {"rtol": 1e-5, "atol": 1e-6}


def torchrun(*args: str, timeout: float) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the worker on 2 CPU processes; ``--standalone`` picks a free port. Returns the result and seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), *args]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    return result, time.perf_counter() - start


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool = False) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        if exact:
            assert torch.equal(got[name], value), name
        else:
            torch.testing.assert_close(got[name], value, **FP32, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("two_ranks")
    single, _ = make_trainer(None, single_process=True, duration="1ep", save_folder=out / "single_ckpt")
    single.fit()
    result, seconds = torchrun("main", str(out), str(out / "single_ckpt" / "latest.pt"), timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    print(f"2-rank launch (DDP, FSDP, FSDP resume, DDP load): {seconds:.1f} s")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return {"out": out, "ranks": ranks, "single_checkpoint": out / "single_ckpt" / "latest.pt"}


@pytest.fixture(scope="module")
def single_process() -> dict[str, Any]:
    """The reference: one process, batches of 8 = the 2 ranks' batches of 4 together."""
    trainer, ema = make_trainer(None, single_process=True)
    trainer.fit()
    return {
        "ema": {n: t.detach().clone() for n, t in ema.ema_tensors.items()},
        "weights": model_weights(trainer.state.model),
        "eval": eval_history(trainer),
        "ema_nbytes": ema.storage.nbytes,  # type: ignore[union-attr]
    }


def assert_same_eval(got: list[dict[str, float]], expected: list[dict[str, float]]) -> None:
    assert [h["step"] for h in got] == [h["step"] for h in expected]
    for g, e in zip(got, expected, strict=True):
        assert g["eval/loss"] == pytest.approx(e["eval/loss"], rel=1e-5)
        assert g["eval/accuracy"] == e["eval/accuracy"]


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_torchrun_launch_defaults_to_ddp_with_identical_ema_on_every_rank(launch: dict[str, Any]) -> None:
    rank0, rank1 = (r["ddp"] for r in launch["ranks"])
    assert rank0["parallelism"] == "ddp" and rank0["wrapped"] == "DistributedDataParallel"
    assert all("module." not in name for name in rank0["ema"])  # canonical names
    assert_close(rank1["ema"], rank0["ema"], exact=True)


@pytest.mark.slow
def test_ddp_ema_equals_single_process_run_with_the_same_global_batch(
    launch: dict[str, Any], single_process: dict[str, Any]
) -> None:
    ddp = launch["ranks"][0]["ddp"]
    assert_close(ddp["ema"], single_process["ema"])
    assert_close(ddp["weights"], single_process["weights"])
    assert_same_eval(ddp["eval"], single_process["eval"])  # metrics reduced over both ranks' halves


@pytest.mark.slow
def test_ddp_checkpoint_loads_in_one_process_without_renaming(launch: dict[str, Any]) -> None:
    ddp = launch["ranks"][0]["ddp"]
    latest = launch["out"] / "ddp_ckpt" / "latest.pt"
    published = torch.load(latest, weights_only=True)["state"]["model"]
    model = Net()
    model.load_state_dict(published)  # strict: no "module." prefixes to strip
    assert_close({n: t for n, t in model.state_dict().items() if n in ddp["ema"]}, ddp["ema"], exact=True)

    trainer, ema = make_trainer(None, single_process=True, load_path=latest)
    assert trainer.state.timestamp.batch == 8
    assert_close(model_weights(trainer.state.model), ddp["weights"], exact=True)
    assert_close(dict(ema.ema_tensors), ddp["ema"], exact=True)


@pytest.mark.slow
def test_single_process_checkpoint_loads_on_two_ranks(launch: dict[str, Any]) -> None:
    saved = torch.load(launch["single_checkpoint"], weights_only=True)["state"]
    training = {**saved["model"], **saved["algorithms"]["EMA"]["training_weights"]}
    for rank in launch["ranks"]:
        loaded = rank["loaded_single"]
        assert loaded["batch"] == 4
        assert_close(loaded["weights"], training, exact=True)
        assert_close(loaded["ema"], saved["algorithms"]["EMA"]["ema"], exact=True)


# ------------------------------------------------------------------------------------------ FSDP2
@pytest.mark.slow
def test_fsdp_ema_gathered_equals_the_ddp_ema(launch: dict[str, Any]) -> None:
    rank0 = launch["ranks"][0]
    assert_close(rank0["fsdp"]["ema"], rank0["ddp"]["ema"])
    assert_close(rank0["fsdp"]["weights"], rank0["ddp"]["weights"])
    assert_same_eval(rank0["fsdp"]["eval"], rank0["ddp"]["eval"])  # evaluated on the EMA shards


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_overlapped_update_gives_the_same_run_on_two_ranks(launch: dict[str, Any], parallelism: str) -> None:
    for rank in launch["ranks"]:
        overlapped, plain = rank[f"{parallelism}_overlap"], rank[parallelism]
        assert overlapped["overlap"] == "ThreadOverlap"
        assert_close(overlapped["ema"], plain["ema"], exact=True)
        assert_close(overlapped["weights"], plain["weights"], exact=True)
        assert overlapped["eval"] == plain["eval"]


@pytest.mark.slow
def test_fsdp_ema_keeps_about_half_the_bytes_on_each_of_two_ranks(launch: dict[str, Any]) -> None:
    full_bytes = launch["ranks"][0]["ddp"]["ema_nbytes"]  # a DDP rank holds the whole average
    shards = [r["fsdp"]["ema_local_numel"] for r in launch["ranks"]]
    full = {n: t.numel() for n, t in launch["ranks"][0]["ddp"]["ema"].items()}
    for name, numel in full.items():
        if name == "calls":  # buffers are not sharded by FSDP
            assert all(s[name] == numel for s in shards)
        else:  # the two shards partition each parameter
            assert shards[0][name] + shards[1][name] == numel, name
    ratios = [r["fsdp"]["ema_nbytes"] / full_bytes for r in launch["ranks"]]
    print(f"per-rank EMA bytes / full EMA bytes: {ratios[0]:.3f}, {ratios[1]:.3f}")
    assert all(0.4 < ratio < 0.6 for ratio in ratios), ratios


@pytest.mark.slow
def test_fsdp_ema_update_is_shard_local_and_needs_no_communication(launch: dict[str, Any]) -> None:
    assert [r["fsdp"]["update_is_local"] for r in launch["ranks"]] == [True, True]


@pytest.mark.slow
def test_fsdp_nonfinite_shard_on_one_rank_makes_every_rank_skip_the_update(launch: dict[str, Any]) -> None:
    assert [r["nan_skips"] for r in launch["ranks"]] == [{"skipped": 1, "updates": 1}] * 2


@pytest.mark.slow
def test_fsdp_ema_model_is_a_sharded_teacher_giving_the_swapped_models_outputs(launch: dict[str, Any]) -> None:
    """emakit's Trainer(parallelism='fsdp'): ``ema_model`` runs forward sharded like the student, and its outputs
    are the student's with the average swapped in (the other way to run the average), on every rank."""
    for rank in launch["ranks"]:
        teacher = rank["fsdp"]["teacher"]
        assert teacher["sharded"] and not teacher["requires_grad"]
        torch.testing.assert_close(teacher["teacher_out"], teacher["swapped_out"], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        launch["ranks"][0]["fsdp"]["teacher"]["teacher_out"], launch["ranks"][1]["fsdp"]["teacher"]["teacher_out"]
    )


@pytest.mark.slow
def test_fsdp_checkpoints_are_dcp_directories_with_latest(launch: dict[str, Any]) -> None:
    folder = launch["out"] / "fsdp_ckpt"
    names = sorted(p.name for p in folder.iterdir() if not p.is_symlink())
    assert names == ["ep0-ba2", "ep0-ba4", "ep1-ba6", "ep2-ba8"]  # step 8 once: the final ep2-ba8 replaced ep1-ba8
    assert all((folder / n / ".metadata").is_file() for n in names)
    assert os.readlink(folder / "latest") == "ep2-ba8"


@pytest.mark.slow
def test_fsdp_resumed_mid_epoch_on_two_ranks_equals_the_uninterrupted_run(launch: dict[str, Any]) -> None:
    rank0 = launch["ranks"][0]
    assert rank0["resumed_at"] == 2
    assert_close(rank0["resumed"]["ema"], rank0["fsdp"]["ema"], exact=True)
    assert_close(rank0["resumed"]["weights"], rank0["fsdp"]["weights"], exact=True)
    assert rank0["resumed"]["eval"] == rank0["fsdp"]["eval"]
    assert [r["autoresumed_from"] for r in launch["ranks"]] == ["ep2-ba8"] * 2  # autoresume finds DCP directories


@pytest.mark.slow
def test_fsdp_ema_export_loads_into_a_plain_model(launch: dict[str, Any]) -> None:
    exported = torch.load(launch["out"] / "fsdp_ema_export.pt", weights_only=True)
    model = Net()
    model.load_state_dict(exported)
    state = model.state_dict()
    assert_close(
        {n: state[n] for n in launch["ranks"][0]["fsdp"]["ema"]}, launch["ranks"][0]["fsdp"]["ema"], exact=True
    )
    torch.manual_seed(0)
    assert torch.equal(state["frozen"], Net().frozen)  # frozen parameters are not averaged


@pytest.mark.slow
def test_fsdp_ema_export_from_the_dcp_checkpoint_in_one_process(launch: dict[str, Any], tmp_path: Path) -> None:
    path = export_ema_weights(launch["out"] / "fsdp_ckpt" / "latest", tmp_path / "ema.pt")
    assert path == tmp_path / "ema.pt"
    from_checkpoint = torch.load(path, weights_only=True)
    live = torch.load(launch["out"] / "fsdp_ema_export.pt", weights_only=True)
    assert_close(from_checkpoint, live, exact=True)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process(launch: dict[str, Any]) -> None:
    trainer, ema = make_trainer(None, single_process=True, load_path=launch["out"] / "fsdp_ckpt" / "ep0-ba2")
    assert trainer.seed == SEED and trainer.state.timestamp.batch == 2
    trainer.fit()
    fsdp = launch["ranks"][0]["fsdp"]
    assert_close(dict(ema.ema_tensors), fsdp["ema"])
    assert_close(model_weights(trainer.state.model), fsdp["weights"])


# ------------------------------------------------------------------------------------------ failures
@pytest.mark.slow
def test_a_rank_that_raises_fails_the_launch_with_its_error(tmp_path: Path) -> None:
    result, seconds = torchrun("crash", str(tmp_path), timeout=120)  # a hang would raise TimeoutExpired
    print(f"crash launch ended in {seconds:.1f} s")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "injected failure on rank 1" in output
    assert "rank      : 1" in output  # torchrun's summary names the failed rank


@pytest.mark.slow
def test_a_rank_that_stops_answering_fails_the_launch_after_dist_timeout(tmp_path: Path) -> None:
    result, seconds = torchrun("hang", str(tmp_path), timeout=120)  # dist_timeout=5 s in the worker
    print(f"hang launch ended in {seconds:.1f} s")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Timed out" in output
    assert "another rank died or stopped answering" in output


# ------------------------------------------------------------------------------------------ the demo
@pytest.mark.slow
def test_demo_runs_on_two_cpu_processes(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "emakit", "demo", "--out", str(tmp_path / "run"), "--epochs", "1", "--no-plot"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
    print(f"2-process demo: {time.perf_counter() - start:.1f} s")
    assert_script_finished(result)
    assert result.stdout.count("final accuracy") == 1  # rank 0 prints, rank 1 stays quiet
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    header = re.search(r"batch 16 per rank x 2 ranks = 32 per step, 1 epoch = (\d+) steps", result.stdout)
    assert header is not None, result.stdout[:2000]
    assert int(header.group(1)) == summary["total_batches"]  # what each rank really ran
    assert "model: DigitsCNN," in result.stdout and "DistributedDataParallel" not in result.stdout
    published = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)["state"]["model"]
    assert published and not any(name.startswith("module.") for name in published)


@pytest.mark.slow
def test_readme_fsdp_script_runs_under_torchrun(tmp_path: Path) -> None:
    section = (Path(__file__).resolve().parents[2] / "docs" / "guides" / "distributed.md").read_text()
    script = next(block for block in re.findall(r"```py\n(.*?)```", section, flags=re.S) if "# train.py" in block)
    (tmp_path / "train.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env, cwd=tmp_path)
    assert_script_finished(result)
    assert (tmp_path / "ckpt" / "latest" / ".metadata").is_file()
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    model.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))


@pytest.mark.slow
def test_evaluation_counts_every_validation_sample_once_on_two_ranks(tmp_path: Path) -> None:
    """11 samples on 2 ranks: the sampler repeats one to even out the forwards; the metrics must not count it."""
    from _eval_worker import Net, data
    from torch.utils.data import DataLoader

    from emakit.trainer import evaluate

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("_eval_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    result = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    expected = evaluate(Net(), DataLoader(data(), batch_size=2))
    for rank in range(2):
        got = torch.load(tmp_path / f"eval_rank{rank}.pt", weights_only=True)
        assert got["ddp_real"] + got["fsdp_real"] == (6 if rank == 0 else 5) * 2
        for parallelism in ("ddp", "fsdp"):
            assert got[parallelism]["eval/accuracy"] == expected["eval/accuracy"]
            assert got[parallelism]["eval/loss"] == pytest.approx(expected["eval/loss"], rel=1e-6)
