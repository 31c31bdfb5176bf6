"""EMACallback under Lightning's ModelParallelStrategy: FSDP2 and tensor parallelism on 2 CPU ranks (gloo).

One torchrun launch of ``_lightning_fsdp_worker.py`` runs every 2-rank fit; the expectations come from one
process fitting the same global batches (for the EMA, the training weights and the logged metric), an
uninterrupted fit (for the resume), a hand evaluation of the exported EMA, and the shards themselves.
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

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lightning_fsdp_worker import (
    HALF_LIFE,
    TP_HIDDEN,
    make_sharded_net,
    single_process_loader,
    trainer_options,
    val_data,
)

from conftest import assert_script_finished
from emakit.integrations.lightning import EMACallback

WORKER = Path(__file__).with_name("_lightning_fsdp_worker.py")
FP32 = {"rtol": 1e-5, "atol": 1e-6}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(
        "ignore:.*does not have many workers.*",
        "ignore:.*LeafSpec.*",
        "ignore:.*GPU available.*",
        "ignore:.*The number of training batches.*",
        "ignore:.*litlogger.*",
    ),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("lightning_fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    start = time.perf_counter()
    result = subprocess.run([*command, str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    print(
        f"2-rank Lightning launch (FSDP2 fit, resume, weights_after_fit, TP fit): {time.perf_counter() - start:.1f} s"
    )
    return {"out": out, "ranks": [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]}


def single_process(hidden: int = 7) -> tuple[EMACallback, nn.Module, float]:
    """The same global batches of 8 in one process: its EMA, its module and its last logged val_loss."""
    model = make_sharded_net(None, hidden=hidden)
    callback = EMACallback(half_life=HALF_LIFE)
    trainer = pl.Trainer(callbacks=[callback], devices=1, **trainer_options())
    trainer.fit(model, single_process_loader(), DataLoader(val_data(), batch_size=4))
    return callback, model, float(trainer.callback_metrics["val_loss"])


def load_export(path: Path, hidden: int = 7) -> nn.Module:
    from safetensors.torch import load_file

    model = make_sharded_net(None, hidden=hidden)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def hand_loss(module: nn.Module) -> float:
    x, y = val_data().tensors
    with torch.no_grad():
        return float(nn.functional.cross_entropy(module(x), y))


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, **FP32, msg=lambda m, n=name: f"{n}: {m}")


def assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape and torch.equal(got[name], value), name


# ------------------------------------------------------------------------------------------ FSDP2
def test_shards_are_uneven_and_one_is_empty(ranks: dict[str, Any]) -> None:
    shapes = [{n: tuple(t.shape) for n, t in r["fsdp"]["local_ema"].items()} for r in ranks["ranks"]]
    assert shapes[0] == {"fc1.weight": (4, 4), "fc1.bias": (4,), "fc2.weight": (2, 7), "fc2.bias": (2,), "scale": (1,)}
    assert shapes[1] == {"fc1.weight": (3, 4), "fc1.bias": (3,), "fc2.weight": (1, 7), "fc2.bias": (1,), "scale": (0,)}
    assert set(ranks["ranks"][0]["fsdp"]["placements"].values()) == {"(Shard(dim=0),)"}


def test_fsdp_ema_exported_whole_equals_single_process_ema(ranks: dict[str, Any]) -> None:
    fsdp = ranks["ranks"][0]["fsdp"]
    callback, model, _ = single_process()
    assert fsdp["batch"] == callback.averager.timestamp.batch == 12
    assert fsdp["num_updates"] == (callback.averager.n_averaged - 1) == 11
    # Gradients are averaged across the ranks in another order than one batch of 8: equal to fp32 rounding.
    assert_close(load_export(ranks["out"] / "fsdp_ema.safetensors").state_dict(), dict(callback.averager.ema_tensors))
    assert_close(fsdp["full_weights"], model.state_dict())
    # Each rank's average is its own shard of that EMA.
    for rank, r in enumerate(ranks["ranks"]):
        for name, shard in r["fsdp"]["local_ema"].items():
            whole = callback.averager.ema_tensors[name]
            rows = -(-whole.shape[0] // 2)
            torch.testing.assert_close(shard, whole[rank * rows : (rank + 1) * rows], **FP32)


def test_logged_validation_metric_is_the_exported_ema_evaluated_by_hand(ranks: dict[str, Any]) -> None:
    metrics = ranks["ranks"][0]["fsdp"]["metrics"]
    assert len(metrics) == 2
    exported = load_export(ranks["out"] / "fsdp_ema.safetensors")
    assert metrics[-1] == pytest.approx(hand_loss(exported), rel=1e-5)
    _, _, single_metric = single_process()
    assert metrics[-1] == pytest.approx(single_metric, rel=1e-5)


def test_validation_swaps_shards_in_and_puts_training_weights_back_bitwise(ranks: dict[str, Any]) -> None:
    for r in ranks["ranks"]:
        fsdp = r["fsdp"]
        for before, during, after in zip(fsdp["before"], fsdp["during"], fsdp["after"], strict=True):
            assert_equal(after, before)
            assert any(not torch.equal(during[n], before[n]) for n in before if before[n].numel())
        assert_equal(fsdp["during"][-1], fsdp["local_ema"])  # the last validation ran on the final average
        assert_equal(fsdp["after"][-1], fsdp["local_weights"])


def test_an_ema_update_runs_no_collective(ranks: dict[str, Any]) -> None:
    for r in ranks["ranks"]:
        for run in ("fsdp", "tp"):
            assert r[run]["collectives_per_update"] == [0] * 12  # 12 optimizer steps: the start and 11 updates
        assert r["fsdp"]["probe_collectives"] > 0  # the counter does see a gather


def test_resume_from_epoch_end_checkpoint_folder_equals_uninterrupted_bitwise(ranks: dict[str, Any]) -> None:
    for r in ranks["ranks"]:
        assert r["resumed"]["num_updates"] == r["fsdp"]["num_updates"] == 11
        assert_equal(r["resumed"]["local_ema"], r["fsdp"]["local_ema"])
        assert_equal(r["resumed"]["local_weights"], r["fsdp"]["local_weights"])
    files = ranks["ranks"][0]["resumed"]["checkpoint_files"]
    assert ".metadata" in files and "meta.pt" in files and sum(f.endswith(".distcp") for f in files) == 2


def test_checkpoint_folder_publishes_the_ema_and_keeps_training_weights_apart(ranks: dict[str, Any]) -> None:
    """Read offline, without a process group: the folder's state_dict is the EMA, its emakit entry the rest."""
    from emakit.checkpoint import read_sharded_checkpoint
    from emakit.integrations.lightning import SHARDED_STATE_KEY

    folder = ranks["out"] / "ckpt" / "epoch=1.ckpt"
    saved = read_sharded_checkpoint(folder, keep=lambda keys: keys[0] == "state_dict")["state_dict"]
    extra = saved.pop(SHARDED_STATE_KEY)
    exported = load_export(ranks["out"] / "fsdp_ema.safetensors")
    assert_equal(saved, exported.state_dict())
    assert_equal(extra["ema"], exported.state_dict())
    assert_equal(extra["training"], ranks["ranks"][0]["fsdp"]["full_weights"])
    meta = torch.load(folder / "meta.pt", weights_only=False)
    assert meta["callbacks"]["EMACallback"]["ema"]["ema"] is None  # no tensors in the rank-0 metadata file


def test_weights_after_fit_ema_leaves_the_average_in_the_sharded_module(ranks: dict[str, Any]) -> None:
    for r in ranks["ranks"]:
        assert_equal(r["ema_after_fit"]["module"], r["ema_after_fit"]["local_ema"])
        assert_equal(r["ema_after_fit"]["local_ema"], r["fsdp"]["local_ema"])


# ------------------------------------------------------------------------------------------ tensor parallel
def test_tensor_parallel_ema_equals_single_process_ema(ranks: dict[str, Any]) -> None:
    tp = ranks["ranks"][0]["tp"]
    assert tp["placements"] == {
        "fc1.weight": "(Shard(dim=0),)",
        "fc1.bias": "(Shard(dim=0),)",
        "fc2.weight": "(Shard(dim=1),)",
        "fc2.bias": "(Replicate(),)",
        "scale": "plain",
    }
    callback, model, _ = single_process(hidden=TP_HIDDEN)
    exported = load_export(ranks["out"] / "tp_ema.safetensors", hidden=TP_HIDDEN)
    assert_close(exported.state_dict(), dict(callback.averager.ema_tensors))
    assert_close(tp["full_weights"], model.state_dict())
    assert tp["metrics"] == pytest.approx(hand_loss(exported), rel=1e-5)


def test_offline_export_of_the_checkpoint_folder_equals_the_live_export(ranks: dict[str, Any], tmp_path: Path) -> None:
    """No process group here: the folder's EMA weights are read and written one tensor at a time."""
    from safetensors.torch import load_file

    from emakit import export_ema_weights

    live = load_file(str(ranks["out"] / "fsdp_ema.safetensors"))
    export_ema_weights(ranks["out"] / "ckpt" / "epoch=1.ckpt", tmp_path / "offline.safetensors")
    assert_equal(load_file(str(tmp_path / "offline.safetensors")), live)
    export_ema_weights(ranks["out"] / "ckpt" / "epoch=1.ckpt", tmp_path / "sharded", max_shard_size=64)
    parts = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert parts[-1] == "model.safetensors.index.json"
    loaded = {}
    for name in parts[:-1]:
        loaded.update(load_file(str(tmp_path / "sharded" / name)))
    assert_equal(loaded, live)


def docs_fsdp2_block() -> str:
    """The python block of docs/guides/lightning.md's sharded-models section."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "guides" / "lightning.md").read_text(encoding="utf-8")
    section = text.split("<!-- begin: Lightning sharded models (ModelParallelStrategy) -->", 1)[1]
    section = section.split("<!-- end: Lightning sharded models (ModelParallelStrategy) -->", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the sharded-models section has one python block"
    return blocks[0]


def test_docs_fsdp2_example_runs_as_written_under_torchrun(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    (tmp_path / "train.py").write_text(docs_fsdp2_block(), encoding="utf-8")
    # run in an empty folder: this checkout's emakit first on the path, whatever PYTHONPATH said relative to it
    paths = [str(Path(__file__).resolve().parents[2] / "src"), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    paths = [str(Path(p).resolve()) for p in paths if p]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(paths)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert_script_finished(result)
    folder = tmp_path / "ema_weights"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        weights.update(load_file(str(folder / name)))
    plain = nn.Sequential(nn.Linear(8, 31), nn.ReLU(), nn.Linear(31, 2))
    plain.load_state_dict({k.removeprefix("body."): v for k, v in weights.items()}, strict=True)
    # The checkpoint folder Lightning wrote holds the same average, exported offline here.
    (checkpoint,) = (tmp_path / "runs").rglob("*.ckpt")
    from emakit import export_ema_weights

    export_ema_weights(checkpoint, tmp_path / "offline.safetensors")
    assert_equal(load_file(str(tmp_path / "offline.safetensors")), weights)
