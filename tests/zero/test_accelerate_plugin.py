"""Why prepare_ema still refuses ZeRO-3: Accelerate's DeepSpeed plugin does not run several processes on CPU.

Under torchrun on 2 CPU ranks, ``Accelerator(deepspeed_plugin=...)`` has DeepSpeed partition the parameters
over the 2 ranks, while Accelerate counts one process and calls both ranks the main one (with ``cpu=True``
it drops the plugin and runs plain multi-CPU). Should a release change that, this test fails: the refusal in
emakit/integrations/accelerate.py can then be replaced by per-rank EMA states, as the Transformers Trainer has.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _launch import deepspeed_env

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
cpu = sys.argv[2] == "cpu"
accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config), cpu=cpu)
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


@pytest.mark.parametrize("cpu", ["cpu", "device"])
def test_accelerate_deepspeed_plugin_on_two_cpu_ranks(tmp_path: Path, cpu: str) -> None:
    (tmp_path / "probe.py").write_text(SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "probe.py"]
    result = subprocess.run(
        [*command, str(tmp_path), cpu], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=deepspeed_env()
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in range(2)]
    for rank, (index, world, kind, processes, main, whole, held) in enumerate(ranks):
        assert (int(index), int(world)) == (rank, 2)
        if cpu == "cpu":  # the plugin is dropped: plain multi-CPU data parallelism, whole parameters
            assert (kind, processes, whole, held) == ("MULTI_CPU", "2", "0", "128")
        else:  # DeepSpeed partitions over 2 ranks, but Accelerate counts 1 process, each of them the main one
            assert (kind, processes, main, whole, held) == ("DEEPSPEED", "1", "True", "128", "64")
