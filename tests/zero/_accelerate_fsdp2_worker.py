"""``prepare_ema`` on a model sharded with ``fully_shard`` before ``accelerator.prepare``, 2 CPU ranks, for
tests/zero/test_accelerate_fsdp2.py.

``python -m torch.distributed.run --nproc_per_node=2 _accelerate_fsdp2_worker.py OUT``. The Accelerator runs
over gloo (``InitProcessGroupKwargs``); each rank trains on its own batches. One run of ``STEPS`` steps that
checkpoints after step ``SAVE_AT`` (the model and Adam with torch.distributed.checkpoint, the EMA with
``save_ema_state``); a second run from fresh objects that resumes from that checkpoint and trains to ``STEPS``.
Every rank records: the whole weights after each step (gathered: the oracle's input), its shards of the EMA and
of the training weights, the model's output on a fixed batch inside ``average_parameters()``, whether the
training shards came back bit for bit, what ``save_state`` did, and the files of the checkpoint. Results go to
``OUT/rank<r>.pt``; a final barrier, then a hard exit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from emakit import EMA, export_ema_weights
from emakit.integrations.accelerate import prepare_ema
from emakit.integrations.rank_states import load_ema_state, save_ema_state

SMOOTHING = 0.75
STEPS, SAVE_AT = 6, 3


def plain_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def eval_inputs() -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(99))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(4, 8, generator=generator), torch.randn(4, 4, generator=generator)


def build(accelerator: Accelerator) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = plain_model()
    fully_shard(model[0])
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, prepare_ema(accelerator, model, EMA(smoothing=SMOOTHING))


def whole(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def local(tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {n: getattr(t, "_local_tensor", t).detach().clone() for n, t in tensors.items()}


def train(model: nn.Module, optimizer: Any, ema: Any, accelerator: Accelerator, steps: range, rank: int) -> list:
    after_step = []
    for step in steps:
        inputs, targets = batch(rank, step)
        loss = nn.functional.mse_loss(model(inputs), targets)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        ema.step()
        after_step.append(whole(model))
    return after_step


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    rank = dist.get_rank()
    record: dict[str, Any] = {"num_processes": accelerator.num_processes}
    folder = out / "ckpt"

    model, optimizer, ema = build(accelerator)
    record["dtensor_params"] = all(hasattr(p, "full_tensor") for p in model.parameters())
    record["registered"] = any(o is ema for o in accelerator._custom_objects)
    weights = train(model, optimizer, ema, accelerator, range(1, SAVE_AT + 1), rank)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
    record["saved_to"] = str(save_ema_state(ema, folder))
    weights += train(model, optimizer, ema, accelerator, range(SAVE_AT + 1, STEPS + 1), rank)
    record["weights"] = weights
    record["files"] = sorted(os.listdir(folder))

    before = local(dict(model.named_parameters()))
    model(eval_inputs())  # an ordinary forward first: FSDP2 may keep the root's parameters gathered after it
    with torch.no_grad(), ema.average_parameters():
        record["ema_output"] = model(eval_inputs()).detach().clone()
    record["unchanged_by_eval"] = all(
        torch.equal(before[n], t) for n, t in local(dict(model.named_parameters())).items()
    )
    export_ema_weights(ema, out / "ema.safetensors", overwrite=True)
    record["ema"] = local(ema.state_dict()["ema"])
    record["training"] = local(dict(model.named_parameters()))
    try:
        accelerator.save_state(str(out / "accelerate_state"))
        record["save_state"] = None
    except Exception as error:  # Accelerate writes the main process's state dicts alone
        record["save_state"] = f"{type(error).__name__}: {error}"

    model, optimizer, ema = build(accelerator)  # a new run resuming from the checkpoint
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    load_ema_state(ema, folder)
    train(model, optimizer, ema, accelerator, range(SAVE_AT + 1, STEPS + 1), rank)
    record["resumed_ema"] = local(ema.state_dict()["ema"])
    record["resumed_training"] = local(dict(model.named_parameters()))

    torch.save(record, out / f"rank{rank}.pt")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
