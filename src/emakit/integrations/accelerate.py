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

When each rank holds only its part of the average (DeepSpeed ZeRO-3 through Accelerate's DeepSpeed plugin;
a model sharded with FSDP2's ``fully_shard`` before ``accelerator.prepare``), the EMA is partition-local: each
rank averages its own partitions or shards, with no communication, and ``prepare_ema`` registers two hooks in
place of the object: ``save_state`` has every rank write ``emakit_ema_rank{r}.pt`` (its part) into the folder,
and ``load_state`` has every rank read its own back (refusing a folder written by another number of ranks).
Call both on every rank (DeepSpeed's own checkpoint needs that too). On CPU ranks,
build the Accelerator with ``InitProcessGroupKwargs(backend="gloo")``, without which Accelerate counts one
process per rank. Accelerate's ``save_state`` cannot write a model sharded before ``prepare`` (it writes the
main process's state dicts alone); checkpoint that model and its optimizer with ``torch.distributed.checkpoint``
and the EMA with :func:`emakit.integrations.rank_states.save_ema_state`/``load_ema_state`` on every rank.
"""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from emakit.averaging import EMA, Averager
from emakit.integrations.rank_states import (
    WHOLE_STATE_NAME,
    expected_states,
    holds_partitions,
    read_state,
    state_to_load,
    state_to_save,
    write_state,
)
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
    steps as ``'ba'``). Under ZeRO-3 or with a model sharded by ``fully_shard`` the EMA holds this rank's part
    and is saved per rank by ``save_state`` hooks (see the module's docstring). Refuses, with a ValueError,
    Accelerate's FSDP plugin and Megatron-LM (untested here: they need GPUs), and a second call with the same
    ``ema``.
    """
    if ema is None:
        ema = EMA()
    if not isinstance(ema, Averager):
        raise TypeError(f"ema must be an emakit averager (emakit.EMA or emakit.SWA), got {type(ema).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _registered(accelerator, ema):
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
            "pass Accelerator(cpu=True) (or accelerate launch --cpu), or, with DeepSpeed or a model sharded by "
            "fully_shard, Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend='gloo')])",
            stacklevel=2,
        )
    ema.attach(model, max_duration=max_duration, batches_per_epoch=batches_per_epoch)
    if holds_partitions(ema):  # each rank's own part: every rank writes and reads its own file
        accelerator.register_save_state_pre_hook(partial(_save_part, ema))
        accelerator.register_load_state_pre_hook(partial(_load_part, ema))
    else:
        accelerator.register_for_checkpointing(ema)
    return ema


def _registered(accelerator: Any, ema: Averager) -> bool:
    hooks = getattr(accelerator, "_save_model_state_pre_hook", {}).values()
    parts = any(isinstance(hook, partial) and hook.args[:1] == (ema,) for hook in hooks)
    return parts or any(registered is ema for registered in getattr(accelerator, "_custom_objects", ()))


def _save_part(ema: Averager, models: list[Any], weights: list[Any], output_dir: str) -> None:
    """``save_state``'s hook, on every rank: this rank's part of the average into the folder being written
    (replacing one a former ``save_state`` of that folder wrote, as Accelerate replaces its own files)."""
    target = state_to_save(ema, Path(output_dir), WHOLE_STATE_NAME, should_save=True)
    assert target is not None
    write_state(ema, target, overwrite=True)


def _load_part(ema: Averager, models: list[Any], input_dir: str) -> None:
    """``load_state``'s hook, on every rank: this rank's part of the average, or a warning when there is none."""
    path = state_to_load(ema, Path(input_dir), WHOLE_STATE_NAME)
    if path is None:
        warnings.warn(
            f"{input_dir} holds no {expected_states(ema, WHOLE_STATE_NAME)}: the EMA keeps its current state",
            stacklevel=3,
        )
        return
    read_state(ema, path)


def _refuse_unsupported(accelerator: Any, model: nn.Module) -> None:
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind in ("FSDP", "MEGATRON_LM"):
        raise ValueError(
            f"prepare_ema does not support distributed_type={kind}: each rank holds only its part of the weights, "
            "and Accelerate saves registered objects from the main process only. Use DDP, or emakit's "
            "Trainer(parallelism='fsdp'), which keeps and checkpoints a shard-local EMA"
        )
