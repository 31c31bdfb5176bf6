"""Hugging Face Accelerate: an averager (:class:`emakit.EMA`, :class:`emakit.SWA`) in a plain Accelerate loop, in
``save_state``/``load_state``.

The loop calls the averager's verbs itself; :func:`prepare_ema` only connects it to the Accelerator::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = prepare_ema(accelerator, model, EMA(half_life="500ba"), max_duration=f"{max_steps}ba")
    if resuming:
        accelerator.load_state(folder)          # restores the EMA too: it is attached by now
    for batch in loader:
        with accelerator.accumulate(model):
            ...; accelerator.backward(loss); optimizer.step(); optimizer.zero_grad()
        if accelerator.sync_gradients:          # once per optimizer step, not per micro-batch
            ema.step()
    with ema.average_parameters():              # evaluate the EMA weights
        evaluate(model)
    accelerator.save_state(folder)              # custom_checkpoint_<i>.pkl holds ema.state_dict()

What Accelerate does with it: ``register_for_checkpointing`` keeps a list; ``save_state`` writes each
object's ``state_dict()`` with ``torch.save`` as ``custom_checkpoint_<i>.pkl`` (``<i>`` is the registration
order) on the main process, and ``load_state`` reads them back with ``weights_only=False`` into
``load_state_dict``. So the EMA must be registered in the same order in the resumed run, and attached
before ``load_state`` (it loads into the model's tensors' shapes and devices): ``prepare_ema`` does both
at once. Nothing here is a collective, so ``save_state`` may be called on the main process only.

A model sharded with FSDP2's ``fully_shard`` before ``accelerator.prepare`` (DTensor parameters, the
Accelerator built with ``InitProcessGroupKwargs(backend="gloo")`` on CPU ranks) gets a shard-local EMA: each rank
averages its own shards, with no communication. ``save_state`` cannot hold it (nor the model: Accelerate
writes the main process's state dicts alone), so it is not registered; checkpoint the model and optimizer
with ``torch.distributed.checkpoint`` and the EMA with :func:`emakit.integrations.rank_states.save_ema_state`
(one file per rank), restored by ``load_ema_state``::

    save_ema_state(ema, folder, overwrite=True)   # every rank: emakit_ema_rank{r}.pt, its shards
    load_ema_state(ema, folder)                   # every rank, after prepare_ema
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

from torch import nn

from emakit.averaging import EMA, Averager
from emakit.integrations.rank_states import holds_partitions
from emakit.time import Time

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["prepare_ema"]


def prepare_ema(
    accelerator: Accelerator,
    model: nn.Module,
    ema: Averager | None = None,
    *,
    max_duration: str | Time | None = None,
    batches_per_epoch: int | None = None,
) -> Averager:
    """Attach the averager ``ema`` (default ``EMA()``; an :class:`emakit.SWA` too) to ``model`` and register it for ``accelerator.save_state``/``load_state``.

    Call it after ``accelerator.prepare`` and before ``accelerator.load_state``. ``max_duration`` and
    ``batches_per_epoch`` go to :meth:`emakit.EMA.attach` (only ``'dur'`` times need them; count optimizer
    steps as ``'ba'``). A model sharded with ``fully_shard`` before ``prepare`` gets a shard-local EMA, not
    registered (see the module's docstring). Refuses, with a ValueError, the set-ups whose EMA ``save_state``
    would lose: Accelerate's FSDP plugin, DeepSpeed ZeRO-3 and Megatron-LM (each rank holds only part of the
    weights, and Accelerate writes registered objects from the main process only), and a second call with the
    same ``ema``.
    """
    if ema is None:
        ema = EMA()
    if not isinstance(ema, Averager):
        raise TypeError(f"ema must be an emakit averager (emakit.EMA or emakit.SWA), got {type(ema).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(registered is ema for registered in getattr(accelerator, "_custom_objects", ())):
        raise ValueError(
            "prepare_ema was already called with this EMA (or SWA): it is registered with the Accelerator once, and a second "
            "registration would save its state twice and make a resumed run's load_state fail. Call prepare_ema "
            "once per averager"
        )
    _refuse_unsupported(accelerator, model)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        warnings.warn(
            f"{launched} processes were launched but the Accelerator runs each alone (num_processes=1), so every "
            "process trains its own model and writes the same checkpoint files; on a machine without a GPU, "
            "pass Accelerator(cpu=True) (or accelerate launch --cpu)",
            stacklevel=2,
        )
    ema.attach(model, max_duration=max_duration, batches_per_epoch=batches_per_epoch)
    if not holds_partitions(ema):  # each rank's shards: save_ema_state on every rank, not save_state
        accelerator.register_for_checkpointing(ema)
    return ema


def _refuse_unsupported(accelerator: Any, model: nn.Module) -> None:
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind in ("FSDP", "MEGATRON_LM"):
        raise ValueError(
            f"prepare_ema does not support distributed_type={kind}: each rank holds only its part of the weights, "
            "and Accelerate saves registered objects from the main process only. Use DDP, or emakit's "
            "Trainer(parallelism='fsdp'), which keeps and checkpoints a shard-local EMA"
        )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    if kind == "DEEPSPEED" and stage is not None and int(stage) >= 3:
        raise ValueError(
            f"prepare_ema does not support DeepSpeed ZeRO stage {stage} yet: each rank's EMA holds its own ZeRO-3 "
            "partitions, which save_state (registered objects, written by the main process only) cannot keep, "
            "and Accelerate's DeepSpeed plugin does not run several processes on CPU, where emakit is tested. "
            "ZeRO-3 is supported in DeepSpeed's own loop (deepspeed.initialize; attach the EMA to "
            "engine.module) and in the Transformers Trainer (TrainingArguments.deepspeed); ZeRO stages 0-2 are "
            "supported here"
        )
    zero3 = next((name for name, param in model.named_parameters() if hasattr(param, "ds_status")), None)
    if zero3 is not None:
        raise ValueError(
            f"prepare_ema does not support parameters partitioned by DeepSpeed ZeRO-3 (parameter {zero3!r}): "
            "save_state writes registered objects from the main process only, while each rank holds its own "
            "partitions of the average. ZeRO-3 is supported in DeepSpeed's own loop and the Transformers Trainer"
        )
