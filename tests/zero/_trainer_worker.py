"""The Transformers ``EMATrainer`` on 2 CPU ranks with a partitioned model, for tests/zero/test_zero_trainer.py.

``python -m torch.distributed.run --nproc_per_node=2 _trainer_worker.py OUT MODE``, MODE one of:

- ``zero3``: ``TrainingArguments(deepspeed={... stage 3 ...}, use_cpu=True)``. A run of ``STEPS`` steps with a
  checkpoint every ``SAVE_AT``; the same run cut after step ``SAVE_AT`` and resumed from its checkpoint by a new
  Trainer; then a resume from a copy of that checkpoint missing rank 1's EMA state (as if saved by 1 rank).
- ``fsdp2``: the model sharded with ``fully_shard`` before the Trainer sees it (``ddp_backend="gloo"``); no
  checkpoints (Transformers cannot write them for such a model), and that refusal.

Rank 0 records the whole trainable weights after every step (gathered on every rank: the oracle's input);
every rank records its partitions or shards of the EMA and of the training weights, the evaluation loss on
the EMA, and writes the exported EMA. Results go to ``OUT/<mode>_rank<r>.pt``; a final barrier, then a hard exit.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _launch import finish
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from _hf_common import StopAt, TokenData, tiny_model, training_args
from transformers import TrainerCallback

from emakit import export_ema_weights
from emakit.integrations.transformers import EMACallback, EMATrainer

SMOOTHING = 0.75
STEPS, SAVE_AT = 6, 3
DEEPSPEED = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "optimizer": {"type": "Adam", "params": {"lr": "auto", "torch_adam": True}},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def whole(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole trainable parameters (tied ones once): a collective, every rank calls it."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if any(hasattr(p, "ds_tensor") for p in params.values()):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}
    return {
        n: p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
        for n, p in params.items()
    }


def local(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's part of every parameter: its ZeRO-3 partition (with padding) or its DTensor shard."""
    parts = {}
    for n, p in model.named_parameters():
        part = p.ds_tensor if hasattr(p, "ds_tensor") else getattr(p, "_local_tensor", p)
        parts[n] = part.detach().clone()
    return parts


class Recorder(TrainerCallback):  # type: ignore[misc]
    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.after_step.append(whole(model))


def sharded_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = tiny_model()
    for block in model.transformer.h:
        fully_shard(block)
    return fully_shard(model)


def trainer(mode: str, folder: Path, *callbacks: Any, **overrides: Any) -> EMATrainer:
    if mode == "zero3":
        model, extra = tiny_model(), {"deepspeed": DEEPSPEED, "save_strategy": "steps", "save_steps": SAVE_AT}
    else:  # the loss is a per-rank mean: averaging token counts across ranks would double it under plain torchrun
        model = sharded_model()
        extra = {"use_cpu": False, "ddp_backend": "gloo", "average_tokens_across_devices": False}
    args = training_args(folder, per_device_train_batch_size=2, max_steps=STEPS, **{**extra, **overrides})
    return EMATrainer(
        model=model,
        args=args,
        train_dataset=TokenData(40, seed=0),
        eval_dataset=TokenData(16, seed=1),
        callbacks=list(callbacks),
    )


def ema_parts(callback: EMACallback) -> dict[str, torch.Tensor]:
    """This rank's part of the EMA, as its state holds it (ZeRO-3 partitions, or DTensor shards)."""
    state = callback.averager.state_dict()["ema"]
    return {n: getattr(t, "_local_tensor", t).clone() for n, t in state.items()}


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    if mode == "fsdp2":
        dist.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    record: dict[str, Any] = {}

    callback, recorder = EMACallback(smoothing=SMOOTHING), Recorder()
    full = trainer(mode, out / "full", callback, recorder)
    full.train()
    record["zero3_params"] = all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in full.model.parameters())
    record["dtensor_params"] = all(hasattr(p, "full_tensor") for p in full.model.parameters())
    record["weights"] = recorder.after_step
    before = local(full.model)
    record["eval_loss"] = full.evaluate()["eval_loss"]
    record["unchanged_by_eval"] = all(torch.equal(before[n], t) for n, t in local(full.model).items())
    export_ema_weights(callback, out / f"{mode}_ema.safetensors")
    record["ema"] = ema_parts(callback)
    record["training"] = local(full.model)

    if mode == "zero3":
        dist.barrier()
        record["files"] = sorted(os.listdir(out / "full" / f"checkpoint-{SAVE_AT}"))
        trainer(mode, out / "cut", EMACallback(smoothing=SMOOTHING), StopAt(SAVE_AT)).train()
        resumed_callback = EMACallback(smoothing=SMOOTHING)
        resumed = trainer(mode, out / "cut", resumed_callback)
        resumed.train(resume_from_checkpoint=True)
        record["resumed_ema"] = ema_parts(resumed_callback)
        record["resumed_training"] = local(resumed.model)
        # a checkpoint holding one rank's EMA state, as one rank would have saved it
        other = out / "one_rank" / f"checkpoint-{SAVE_AT}"
        if rank == 0:
            shutil.copytree(out / "cut" / f"checkpoint-{SAVE_AT}", other)
            (other / "emakit_ema_rank1.pt").unlink()
        dist.barrier()
        refused = trainer(mode, out / "one_rank", EMACallback(smoothing=SMOOTHING))
        try:
            refused.train(resume_from_checkpoint=str(other))
            record["other_world"] = None
        except ValueError as error:
            record["other_world"] = str(error)
        record["other_world_step"] = refused.state.global_step
    else:
        try:
            trainer(mode, out / "saving", EMACallback(smoothing=SMOOTHING), save_strategy="steps").train()
            record["saving"] = None
        except ValueError as error:
            record["saving"] = str(error)
    finish(record, out / f"{mode}_rank{rank}.pt")


if __name__ == "__main__":
    main()
