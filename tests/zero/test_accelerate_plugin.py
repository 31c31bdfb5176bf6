"""How Accelerate's DeepSpeed plugin runs on 2 CPU ranks, which tests/zero/test_accelerate_sharded.py relies on.

Under torchrun, ``Accelerator(deepspeed_plugin=...)`` has DeepSpeed partition the parameters over the 2 ranks;
but Accelerate finds no device backend on a machine without an accelerator and then counts one process and
calls both ranks the main one (``state.py``: no backend, no distributed training), and with ``cpu=True`` it
drops the plugin and runs plain multi-CPU. Naming the backend, ``InitProcessGroupKwargs(backend="gloo")``,
gives a DeepSpeed run of 2 processes with one main process: the set-up prepare_ema's ZeRO-3 tests use, and
the one its warning about processes training alone points to. (``accelerate launch --use_deepspeed
--num_processes 2`` behaves the same; ``--cpu`` with ``--use_deepspeed`` is refused by the launcher.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _launch import deepspeed_env, torchrun

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.slow

SCRIPT = """
import os, sys, torch, torch.distributed as dist
from torch import nn
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DummyOptim
config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam", "params": {"lr": 0.01}},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
from accelerate.utils import InitProcessGroupKwargs
how = sys.argv[2]
gloo = [InitProcessGroupKwargs(backend="gloo")] if how == "gloo" else []
accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config), cpu=how == "cpu", kwargs_handlers=gloo)
model = nn.Linear(8, 16)
model, _ = accelerator.prepare(model, DummyOptim(model.parameters()))
weight = next(accelerator.unwrap_model(model).parameters())
line = (f"{dist.get_rank()} {dist.get_world_size()} {accelerator.distributed_type.value} "
        f"{accelerator.num_processes} {accelerator.is_main_process} {getattr(weight, 'ds_numel', 0)} "
        f"{weight.ds_tensor.numel() if hasattr(weight, 'ds_tensor') else weight.numel()}")
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.txt"), "w") as f:
    f.write(line)
dist.barrier()
os._exit(0)
"""


@pytest.mark.parametrize("how", ["cpu", "device", "gloo"])
def test_accelerate_deepspeed_plugin_on_two_cpu_ranks(tmp_path: Path, how: str) -> None:
    (tmp_path / "probe.py").write_text(SCRIPT)
    torchrun("probe.py", str(tmp_path), how, env=deepspeed_env(), cwd=tmp_path, timeout=300)
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in range(2)]
    for rank, (index, world, kind, processes, main, whole, held) in enumerate(ranks):
        assert (int(index), int(world)) == (rank, 2)
        if how == "cpu":  # the plugin is dropped: plain multi-CPU data parallelism, whole parameters
            assert (kind, processes, whole, held) == ("MULTI_CPU", "2", "0", "128")
        elif how == "device":  # DeepSpeed partitions over 2 ranks, but Accelerate counts 1 process, each the main one
            assert (kind, processes, main, whole, held) == ("DEEPSPEED", "1", "True", "128", "64")
        else:  # the backend named: 2 processes, rank 0 the main one, the parameters partitioned
            assert (kind, processes, main, whole, held) == ("DEEPSPEED", "2", str(rank == 0), "128", "64")
