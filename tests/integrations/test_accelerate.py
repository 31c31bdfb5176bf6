"""emakit.integrations.accelerate and examples/accelerate_ema.py against the real Accelerate (CPU).

The reference for resuming is the same example run uninterrupted: cut after a checkpoint and resumed, the
final training weights and EMA must match it to the bit.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("accelerate")

import torch
from _hf_readme import readme_blocks
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from emakit import EMA
from emakit.integrations.accelerate import prepare_ema

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "accelerate_ema.py"
# 512 samples in micro-batches of 64, 2 per optimizer step: 4 steps an epoch, so 10 steps cross two epochs
RUN = ["--steps", "10", "--batch-size", "64", "--accumulate", "2", "--save-every", "3", "--half-life", "4ba"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("accelerate_ema", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def uninterrupted(example: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("full")
    return {"out": out, **example.main([*RUN, "--out", str(out)])}


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("stop_after", [3, 7])  # on a checkpoint (mid-epoch 1); past one (resumes from 6)
def test_example_resumes_exactly(
    example: ModuleType, uninterrupted: dict[str, Any], tmp_path: Path, stop_after: int
) -> None:
    assert example.main([*RUN, "--out", str(tmp_path), "--stop-after", str(stop_after)]) == {"step": stop_after}
    resumed = example.main([*RUN, "--out", str(tmp_path), "--resume"])

    assert resumed["step"] == uninterrupted["step"] == 10
    assert_same(resumed["weights"], uninterrupted["weights"])  # dropout, shuffling, schedule: all restored
    assert_same(resumed["ema"], uninterrupted["ema"])
    assert resumed["timestamp"] == uninterrupted["timestamp"]
    assert resumed["n_averaged"] == uninterrupted["n_averaged"]


def test_example_updates_once_per_optimizer_step(uninterrupted: dict[str, Any]) -> None:
    # 10 optimizer steps of 2 micro-batches: started at step 1, blended at steps 2..10; epochs 1 and 2 done
    assert uninterrupted["timestamp"]["batch"] == 10
    assert uninterrupted["timestamp"]["epoch"] == 2
    assert uninterrupted["n_averaged"] == 10


def test_example_checkpoints_hold_the_ema_and_the_export_loads(
    example: ModuleType, uninterrupted: dict[str, Any]
) -> None:
    out = uninterrupted["out"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_10", "step_3", "step_6", "step_9"]
    state = torch.load(out / "checkpoints" / "step_10" / "custom_checkpoint_0.pkl", weights_only=True)
    assert state["timestamp"]["batch"] == 10
    assert_same(dict(state["ema"]), uninterrupted["ema"])
    model = example.make_model()
    model.load_state_dict(load_file(out / "ema_weights.safetensors"))
    assert_same(model.state_dict(), uninterrupted["ema"])  # num_batches_tracked is copied, so it matches too


def test_example_rejects_bad_arguments(example: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        example.main(["--steps", "0"])
    assert "--steps must be a positive integer, got 0" in capsys.readouterr().err


def test_resume_without_a_checkpoint_says_so(example: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--resume: no checkpoint in"):
        example.main([*RUN, "--out", str(tmp_path), "--resume"])


# ------------------------------------------------------------------------------------- prepare_ema
def test_prepare_ema_attaches_and_registers_for_checkpointing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(nn.Linear(3, 2))
    ema = prepare_ema(accelerator, model, EMA(smoothing=0.5))
    assert ema.model is model
    ema.step()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.step()
    accelerator.save_state(str(tmp_path))

    other = Accelerator(cpu=True)
    fresh = other.prepare(nn.Linear(3, 2))
    restored = prepare_ema(other, fresh, EMA(smoothing=0.5))
    other.load_state(str(tmp_path))
    assert_same(restored.ema_tensors, ema.ema_tensors)
    assert (restored.n_averaged - 1) == 1 and restored.timestamp.batch == 2


def test_prepare_ema_twice_with_the_same_ema_is_refused_and_resume_still_works(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(nn.Linear(3, 2))
    ema = prepare_ema(accelerator, model, EMA(smoothing=0.5))
    with pytest.raises(
        ValueError, match=r"prepare_ema was already called with this EMA \(or SWA\): it is registered with the"
    ):
        prepare_ema(accelerator, model, ema)
    ema.step()
    accelerator.save_state(str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("custom_checkpoint_*.pkl")) == ["custom_checkpoint_0.pkl"]

    other = Accelerator(cpu=True)
    restored = prepare_ema(other, other.prepare(nn.Linear(3, 2)), EMA(smoothing=0.5))
    other.load_state(str(tmp_path))  # the resumed script prepares its EMA once, as it should
    assert_same(restored.ema_tensors, ema.ema_tensors)


def test_prepare_ema_default_and_bad_arguments() -> None:
    accelerator = Accelerator(cpu=True)
    assert isinstance(prepare_ema(accelerator, nn.Linear(2, 2)), EMA)
    with pytest.raises(TypeError, match=r"ema must be an emakit averager \(emakit\.EMA or emakit\.SWA\), got dict"):
        prepare_ema(accelerator, nn.Linear(2, 2), {"half_life": "10ba"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        prepare_ema(accelerator, "model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ema_start='0\.5dur' is a fraction of the training length"):
        ema = prepare_ema(accelerator, nn.Linear(2, 2), EMA(ema_start="0.5dur"))
        ema.step()


@pytest.mark.parametrize(
    ("distributed_type", "zero_stage", "match"),
    [
        ("FSDP", None, "does not support distributed_type=FSDP"),
        ("MEGATRON_LM", None, "does not support distributed_type=MEGATRON_LM"),
    ],
)
def test_prepare_ema_refuses_sharded_setups(distributed_type: str, zero_stage: int | None, match: str) -> None:
    # No FSDP or DeepSpeed on this CPU machine: an object with the attributes prepare_ema reads stands in.
    accelerator = SimpleNamespace(
        distributed_type=distributed_type,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage)),
        num_processes=1,
    )
    with pytest.raises(ValueError, match=match):
        prepare_ema(accelerator, nn.Linear(2, 2))  # type: ignore[arg-type]


def test_prepare_ema_accepts_deepspeed_zero2() -> None:
    accelerator = SimpleNamespace(
        distributed_type="DEEPSPEED",
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2)),
        num_processes=1,
        register_for_checkpointing=lambda *objects: None,
    )
    prepare_ema(accelerator, nn.Linear(2, 2))  # type: ignore[arg-type]


def test_prepare_ema_warns_when_launched_processes_train_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    accelerator = SimpleNamespace(
        distributed_type="NO", state=SimpleNamespace(), num_processes=1, register_for_checkpointing=lambda *o: None
    )
    with pytest.warns(UserWarning, match="2 processes were launched but the Accelerator runs each alone"):
        prepare_ema(accelerator, nn.Linear(2, 2))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- README
def test_readme_accelerate_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = readme_blocks("Accelerate", "accelerate.md")  # docs/guides/accelerate.md
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/guides/accelerate.md", "exec"), {"__name__": "__readme__"})


# ------------------------------------------------------------------------------------- 2 ranks
@pytest.mark.slow
def test_example_under_torchrun_ddp_resumes_exactly(tmp_path: Path) -> None:
    """2 CPU processes (gloo): the example trains with DDP, is cut after step 5 and resumes from step_3."""
    worker = Path(__file__).with_name("_hf_accelerate_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    result = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "resumed from" in result.stdout and "step_3 at step 3" in result.stdout
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["full"]["timestamp"]["epoch"] == 1  # DDP really split the data: 4 steps an epoch per rank

    buffers = {"1.running_mean", "1.running_var"}  # BatchNorm statistics: each rank's own batches (see docs)
    for rank in ranks:
        assert_same(rank["resumed"]["weights"], rank["full"]["weights"])
        params = {n: t for n, t in rank["full"]["ema"].items() if n not in buffers}
        assert_same({n: t for n, t in rank["resumed"]["ema"].items() if n not in buffers}, params)
        assert_same(params, {n: t for n, t in ranks[0]["full"]["ema"].items() if n not in buffers})
    assert_same(ranks[0]["resumed"]["ema"], ranks[0]["full"]["ema"])  # rank 0's EMA is the one checkpointed
    assert_same(ranks[1]["full"]["weights"], ranks[0]["full"]["weights"])


def test_a_partitioned_ema_is_saved_and_loaded_per_rank_by_save_state_hooks(tmp_path: Path) -> None:
    # One rank holding whole ZeRO-3 partitions (the attributes DeepSpeed gives its parameters); the 2-rank runs
    # with Accelerate's DeepSpeed plugin are tests/zero/test_accelerate_sharded.py.
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = nn.Linear(3, 2)
        for p in model.parameters():
            p.ds_tensor = p.detach().reshape(-1).clone()  # type: ignore[attr-defined]
            p.ds_shape, p.ds_numel = p.shape, p.numel()  # type: ignore[attr-defined]
        accelerator = Accelerator(cpu=True)
        ema = prepare_ema(accelerator, model, EMA(smoothing=0.5))
        assert not any(o is ema for o in accelerator._custom_objects)
        with pytest.raises(ValueError, match="prepare_ema was already called with this EMA"):
            prepare_ema(accelerator, model, ema)
        for _ in range(2):
            model.weight.ds_tensor.add_(1.0)  # type: ignore[attr-defined]
            ema.step()
        saved = {n: t.clone() for n, t in ema.state_dict()["ema"].items()}
        accelerator.save_state(str(tmp_path / "ckpt"))
        assert (tmp_path / "ckpt" / "emakit_ema_rank0.pt").is_file()
        assert not list((tmp_path / "ckpt").glob("custom_checkpoint_*"))
        ema.step()
        accelerator.load_state(str(tmp_path / "ckpt"))
        assert ema.n_averaged == 2
        for name, value in ema.state_dict()["ema"].items():
            assert torch.equal(value, saved[name]), name
        (tmp_path / "empty").mkdir()
        with pytest.warns(UserWarning, match=r"holds no emakit_ema_rank0\.pt \(one per rank, ZeRO-3\)"):
            accelerator.load_state(str(tmp_path / "empty"))
    finally:
        torch.distributed.destroy_process_group()
