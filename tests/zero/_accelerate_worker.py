"""``prepare_ema`` with each rank holding part of the model, 2 CPU ranks, for tests/zero/test_accelerate_sharded.py.

``python -m torch.distributed.run --nproc_per_node=2 _accelerate_worker.py OUT MODE``, the Accelerator over gloo
(``InitProcessGroupKwargs``), each rank training on its own batches, MODE one of:

- ``fsdp2``: the model sharded with ``fully_shard`` before ``accelerator.prepare``; the checkpoint after step
  ``SAVE_AT`` is the model and Adam with torch.distributed.checkpoint and the EMA with ``save_ema_state``, and
  the resumed run builds everything afresh (Accelerate's ``save_state`` is tried once, and fails).
- ``zero3``: Accelerate's DeepSpeed plugin at ZeRO stage 3; the checkpoint is ``accelerator.save_state`` (its
  hooks write the EMA per rank), and the resume is ``load_state`` into the same objects, then the same steps.

Every rank records: the whole weights after each step (gathered: the oracle's input), its part of the EMA and
of the training weights, the model's output on a fixed batch inside ``average_parameters()`` (after an ordinary
forward), whether the training parts came back bit for bit, and the checkpoint's files. Results go to
``OUT/<mode>_rank<r>.pt``; a final barrier, then a hard exit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _launch import finish
from torch import nn

from emakit import EMA, export_ema_weights
from emakit.integrations.accelerate import prepare_ema

SMOOTHING = 0.75
STEPS, SAVE_AT = 6, 3
DEEPSPEED = {
    "train_micro_batch_size_per_gpu": 4,
    "optimizer": {"type": "Adam", "params": {"lr": 0.05, "torch_adam": True}},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def plain_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def eval_inputs() -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(99))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(4, 8, generator=generator), torch.randn(4, 4, generator=generator)


def accelerator_for(mode: str) -> Any:
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    gloo = [InitProcessGroupKwargs(backend="gloo")]  # without it Accelerate counts one process per CPU rank
    if mode == "zero3":
        return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=DEEPSPEED), kwargs_handlers=gloo)
    return Accelerator(kwargs_handlers=gloo)


def build(accelerator: Any, mode: str) -> tuple[nn.Module, Any, Any]:
    model = plain_model()
    if mode == "zero3":
        from accelerate.utils import DummyOptim

        model, optimizer = accelerator.prepare(model, DummyOptim(model.parameters()))
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model)
        model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters(), lr=0.05))
    return model, optimizer, prepare_ema(accelerator, model, EMA(smoothing=SMOOTHING))


def module(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DeepSpeed's engine wraps the model


def whole(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole parameters: a collective, every rank calls it."""
    params = dict(module(model).named_parameters())
    if any(hasattr(p, "ds_tensor") for p in params.values()):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}
    return {n: p.full_tensor().detach().clone() for n, p in params.items()}


def local(tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    """This rank's part of each tensor: a ZeRO-3 partition (with its padding), a DTensor shard, or the tensor."""
    parts = {}
    for n, t in tensors.items():
        part = t.ds_tensor if hasattr(t, "ds_tensor") else getattr(t, "_local_tensor", t)
        parts[n] = part.detach().clone()
    return parts


def train(model: nn.Module, optimizer: Any, ema: Any, accelerator: Any, steps: range, rank: int) -> list:
    after_step = []
    for step in steps:
        inputs, targets = batch(rank, step)
        loss = nn.functional.mse_loss(model(inputs), targets)
        accelerator.backward(loss)  # DeepSpeed: its engine's backward and step
        optimizer.step()
        optimizer.zero_grad()
        ema.step()
        after_step.append(whole(model))
    return after_step


def save(mode: str, accelerator: Any, model: nn.Module, optimizer: Any, ema: Any, folder: Path) -> None:
    if mode == "zero3":
        accelerator.save_state(str(folder))
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from emakit.integrations.rank_states import save_ema_state

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
    save_ema_state(ema, folder)


def resume(mode: str, accelerator: Any, folder: Path, built: tuple[nn.Module, Any, Any]) -> tuple[nn.Module, Any, Any]:
    if mode == "zero3":  # Accelerate prepares one DeepSpeed engine per Accelerator: load into the same objects
        accelerator.load_state(str(folder))
        return built
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from emakit.integrations.rank_states import load_ema_state

    model, optimizer, ema = build(accelerator, mode)  # a new run
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    load_ema_state(ema, folder)
    return model, optimizer, ema


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    accelerator = accelerator_for(mode)
    rank = dist.get_rank()
    record: dict[str, Any] = {"num_processes": accelerator.num_processes, "kind": accelerator.distributed_type.value}
    folder = out / f"{mode}_ckpt"

    model, optimizer, ema = build(accelerator, mode)
    params = list(module(model).parameters())
    record["partitioned"] = all(
        (p.numel() == 0 and hasattr(p, "ds_tensor")) or hasattr(p, "full_tensor") for p in params
    )
    record["registered"] = any(o is ema for o in accelerator._custom_objects)
    weights = train(model, optimizer, ema, accelerator, range(1, SAVE_AT + 1), rank)
    save(mode, accelerator, model, optimizer, ema, folder)
    weights += train(model, optimizer, ema, accelerator, range(SAVE_AT + 1, STEPS + 1), rank)
    record["weights"] = weights
    dist.barrier()
    record["files"] = sorted(os.listdir(folder))

    before = local(dict(module(model).named_parameters()))
    with torch.no_grad():
        model(eval_inputs())  # an ordinary forward first: it may leave parameters gathered
        with ema.average_parameters():
            record["ema_output"] = model(eval_inputs()).detach().clone()
    after = local(dict(module(model).named_parameters()))
    record["unchanged_by_eval"] = all(torch.equal(before[n], t) for n, t in after.items())
    export_ema_weights(ema, out / f"{mode}_ema.safetensors", overwrite=True)
    record["ema"] = local(ema.state_dict()["ema"])
    record["training"] = after
    if mode == "fsdp2":
        try:
            accelerator.save_state(str(out / "accelerate_state"))
            record["save_state"] = None
        except Exception as error:  # Accelerate writes the main process's state dicts alone
            record["save_state"] = f"{type(error).__name__}: {error}"

    model, optimizer, ema = resume(mode, accelerator, folder, (model, optimizer, ema))
    train(model, optimizer, ema, accelerator, range(SAVE_AT + 1, STEPS + 1), rank)
    record["resumed_ema"] = local(ema.state_dict()["ema"])
    record["resumed_training"] = local(dict(module(model).named_parameters()))

    finish(record, out / f"{mode}_rank{rank}.pt")


if __name__ == "__main__":
    main()
