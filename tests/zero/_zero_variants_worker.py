"""Averager variants under DeepSpeed ZeRO-3 on 2 CPU ranks, for tests/zero/test_zero_variants.py.

``python -m torch.distributed.run --nproc_per_node=2 _zero_variants_worker.py OUT MODE``, MODE one of:

- ``variants``: the model of ``_zero_worker.py`` at ZeRO-3 with three averagers attached to ``engine.module``:
  a plain EMA, the same EMA with ``overlap=True`` (its update runs in a worker thread alongside the next step)
  and an SWA from step ``SWA_START`` on; the ``ema_model`` and snapshot refusals.
- ``offload``: the same at ZeRO-3 with the optimizer's states and the parameters offloaded to the CPU
  (``offload_optimizer``/``offload_param``), with a plain EMA.

Every rank records the whole weights after each step (gathered: the oracles' input) and exports each average;
results go to ``OUT/<mode>_rank<r>.pt``; a final barrier, then a hard exit.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from _launch import finish
from _zero_worker import SMOOTHING, STEPS, Adapted, config, train_step, whole_weights

from emakit import EMA, SWA, export_ema_weights

SWA_START = 3


def engine_for(mode: str) -> deepspeed.DeepSpeedEngine:
    settings = config(3)
    if mode == "offload":
        settings["zero_optimization"].update(offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
        settings["zero_force_ds_cpu_optimizer"] = False  # torch's Adam on the offloaded states: no op to build
    torch.manual_seed(0)
    model = Adapted()
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=settings)
    return engine


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    engine = engine_for(mode)
    rank = dist.get_rank()
    record: dict[str, Any] = {"partitioned": all(p.numel() == 0 for p in engine.module.parameters())}
    averagers = {"ema": EMA(smoothing=SMOOTHING)}
    if mode == "variants":
        averagers["overlap"] = EMA(smoothing=SMOOTHING, overlap=True)
        averagers["swa"] = SWA(swa_start=f"{SWA_START}ba", update_interval="1ba", update_bn=False)
    for averager in averagers.values():
        averager.attach(engine.module)
    weights = []
    for step in range(1, STEPS + 1):
        train_step(engine, step)
        for averager in averagers.values():
            averager.step()
        weights.append(whole_weights(engine))
    record["weights"] = weights
    record["offloaded"] = getattr(engine.optimizer, "offload_optimizer", False)
    for name, averager in averagers.items():
        export_ema_weights(averager, out / f"{mode}_{name}.safetensors", overwrite=True)
    record["n_averaged"] = {name: averager.n_averaged for name, averager in averagers.items()}
    finish(record, out / f"{mode}_rank{rank}.pt")


if __name__ == "__main__":
    main()
