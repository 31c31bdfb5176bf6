"""Hugging Face Transformers: :class:`emakit.EMA` driven by ``transformers.Trainer``.

``AveragingCallback`` holds an averager (:class:`emakit.EMA`, :class:`emakit.SWA`) and maps the Trainer's events
onto its verbs (``EMACallback`` and ``SWACallback`` only build the averager); ``EMATrainerMixin`` adds the three things a
``TrainerCallback`` cannot do, because callbacks are never given the Trainer and there is no event before an
evaluation or a save: run ``evaluate()``/``predict()`` on the EMA weights, write the EMA as the model in
``save_model()``, and tell the callback which checkpoint ``train(resume_from_checkpoint=...)`` resumes from.

=====================================  ============================================================================
``Trainer(...)`` (``on_init_end``)     unsupported configurations (the Trainer's ``fsdp=``, FSDP1) refused
``train()`` (``on_train_begin``)       a fresh EMA ``attach``-ed to the model, ``set_duration(max_steps ba)``;
                                       when resuming, its state loaded from the checkpoint folder
``on_step_end``                        ``ema.step(num_tokens=...)``: once per optimizer step, after the last
                                       micro-batch of each ``gradient_accumulation_steps`` and after
                                       ``optimizer.step()``; tokens from ``state.num_input_tokens_seen``
``on_epoch_end``                       ``ema.epoch_end()`` for complete epochs (not the cut one at ``max_steps``)
``on_save``                            ``checkpoint-N/ema_weights.safetensors`` (the averaged tensors alone, for
                                       ``load_state_dict``; the whole model for partitioned or sharded models) and
                                       ``checkpoint-N/emakit_ema.pt`` (``ema.state_dict()``); under DeepSpeed
                                       ZeRO-3 each rank's ``emakit_ema_rank{r}.pt`` (its partitions)
``on_train_end``                       with ``load_best_model_at_end``: the EMA of the best checkpoint loaded
``evaluate()``, ``predict()``          ``with ema.average_parameters(model)`` (mixin), once the average started
``save_model()``                       the EMA weights as the model with ``save_ema_as_model=True`` (mixin);
                                       checkpoints the Trainer writes during ``train()`` keep training weights
=====================================  ============================================================================

Usage::

    trainer = EMATrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                         callbacks=[EMACallback(half_life="200ba", save_ema_as_model=True)])
    trainer.train()                      # or train(resume_from_checkpoint=True)
    trainer.evaluate()                   # the EMA weights
    trainer.save_model()                 # from_pretrained(output_dir) loads the EMA model

Another Trainer subclass (TRL's, your own) gets the same with ``class MyTrainer(EMATrainerMixin, SFTTrainer)``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, final

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, has_length

from emakit._compat import dtensor_class
from emakit.averaging import EMA, SWA, Averager
from emakit.averaging.batchnorm import FixedOrder, default_bn_forward
from emakit.checkpoint.contents import model_state_dict
from emakit.checkpoint.export import export_ema_weights
from emakit.checkpoint.streaming import TensorEntry, write_safetensors
from emakit.integrations.amounts import trainer_counting_refusal
from emakit.integrations.arguments import derived_signature, keyword
from emakit.integrations.rank_states import expected_states, read_state, state_to_load, state_to_save, write_state
from emakit.parallel.ranks import get_rank, is_distributed
from emakit.time import Time, TimeUnit

__all__ = [
    "EMA_STATE_NAME",
    "EMA_WEIGHTS_NAME",
    "AveragingCallback",
    "EMACallback",
    "EMATrainer",
    "EMATrainerMixin",
    "SWACallback",
]

#: The average in each checkpoint folder: the tensors it holds (all of a fully trained model's; a LoRA model's
#: adapters, not its frozen base), in the model's dtypes, under the model's names, for
#: ``model.load_state_dict(safetensors.torch.load_file(path), strict=False)``.
EMA_WEIGHTS_NAME = "ema_weights.safetensors"
#: ``ema.state_dict()`` in each checkpoint folder: what ``train(resume_from_checkpoint=...)`` restores.
EMA_STATE_NAME = "emakit_ema.pt"

#: The callbacks' own arguments, after the averager's.
_OWN = [keyword("save_ema_as_model", False, bool), keyword("eval_with_ema", True, bool)]

if TYPE_CHECKING:
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class AveragingCallback(TrainerCallback):
    """Keep an averager of the model a ``transformers.Trainer`` trains, and checkpoint it.

    ``AveragingCallback(EMA(half_life="200ba"))`` or ``AveragingCallback(SWA(swa_start="2ep"))``; the
    :class:`EMACallback` and :class:`SWACallback` subclasses only build the averager from their arguments. Times
    count the Trainer's progress: ``'ba'`` counts optimizer steps (one per ``gradient_accumulation_steps``
    micro-batches, like ``state.global_step``), ``'ep'`` epochs, ``'tok'`` the Trainer's
    ``state.num_input_tokens_seen`` (``TrainingArguments(include_num_input_tokens_seen=True)``, else refused when the
    Trainer is built) and ``'dur'`` is a fraction of ``max_steps`` (the Trainer reports no sample counts, so
    ``'sp'`` times are refused). Post-hoc snapshots are written by
    rank 0; resuming from a checkpoint drops the snapshots written after it, so the series has no gap or
    duplicate. The averager is :attr:`averager`.

    Args:
        averager: the :class:`emakit.EMA` or :class:`emakit.SWA` to drive.
        save_ema_as_model: ``trainer.save_model()`` (and ``push_to_hub``) write the averaged weights as the
            model, so ``from_pretrained`` on the output loads the averaged model. Needs :class:`EMATrainerMixin`.
            Off by default: ``save_model`` writes the training weights; every checkpoint folder holds the averaged
            tensors as ``ema_weights.safetensors``, and ``emakit.export_ema_weights(callback, path)`` writes it
            anywhere (call it on every rank).
        eval_with_ema: ``evaluate()`` and ``predict()`` run on the averaged weights once the average has started
            (needs :class:`EMATrainerMixin`). Set ``callback.eval_with_ema = False`` to evaluate the training
            weights.
        bn_forward: ``bn_forward(model, batch)`` runs one batch for the BatchNorm pass when the averager's window
            closes (default: ``model(**batch)`` for the Trainer's dict batches, else torch's ``update_bn`` rule).
            The batch is on the model's device.

    Every ``checkpoint-N/`` the Trainer writes also holds ``ema_weights.safetensors`` and ``emakit_ema.pt``;
    ``train(resume_from_checkpoint=...)`` restores the averager from them, so the run continues exactly. Each
    ``train()`` call that does not resume starts a new average (as the Trainer starts a new ``TrainerState``).
    """

    def __init__(
        self,
        averager: Averager,
        *,
        save_ema_as_model: bool = False,
        eval_with_ema: bool = True,
        bn_forward: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        if not isinstance(averager, Averager):
            raise TypeError(f"averager must be an emakit averager (EMA, SWA), got {type(averager).__name__}")
        schedule = averager.schedule
        for name, time in ((schedule.start_argument, schedule.start), (schedule.end_argument, schedule.end)):
            if time is not None and time.unit == TimeUnit.SAMPLE:
                raise ValueError(
                    f"{name}='{time}': the Trainer does not report how many samples each optimizer step saw; give "
                    f"{name} in 'ba' (optimizer steps), 'ep' or 'dur' (a fraction of max_steps)"
                )
        refusal = trainer_counting_refusal(type(self).__name__, schedule, True)  # samples: never known
        if refusal is not None:
            raise ValueError(refusal)
        for name, flag in (("save_ema_as_model", save_ema_as_model), ("eval_with_ema", eval_with_ema)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        #: The averager this callback drives (a fresh copy of the one given at each train() that does not resume).
        self.averager = averager
        self._unattached = averager.renewed()
        self.save_ema_as_model = save_ema_as_model
        self.eval_with_ema = eval_with_ema
        self.bn_forward = bn_forward
        #: Set by EMATrainerMixin.train: whether the Trainer runs the mixin, and the resolved resume folder.
        self._served_by_mixin = False
        self._resume_from: str | None = None
        self._attached = False
        self._tokens_seen = 0  # state.num_input_tokens_seen at the last optimizer step

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.averager!r}, save_ema_as_model={self.save_ema_as_model})"

    # ------------------------------------------------------------------ events
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        _refuse_unsupported(args, kwargs.get("model"))
        refusal = trainer_counting_refusal(
            type(self).__name__, self.averager.schedule, args.include_num_input_tokens_seen
        )
        if refusal is not None:
            raise ValueError(refusal)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} needs the Trainer's model at on_train_begin, got {type(model).__name__}"
            )
        self.on_init_end(args, state, control, model=model)
        if state.is_hyper_param_search:
            raise ValueError(
                f"{type(self).__name__} does not support hyperparameter search: its checkpoints go to per-trial folders "
                "that callbacks are not told about"
            )
        served, resume_from = self._served_by_mixin, self._resume_from
        self._served_by_mixin, self._resume_from = False, None
        if self.save_ema_as_model and not served:
            raise ValueError(
                f"{type(self).__name__}(save_ema_as_model=True) needs a Trainer with EMATrainerMixin "
                "(e.g. emakit.integrations.transformers.EMATrainer): a callback cannot change what save_model writes"
            )
        if not served:
            warnings.warn(
                f"{type(self).__name__} runs in a Trainer without EMATrainerMixin: the average is updated and checkpointed, but "
                "evaluate() and predict() use the training weights; use emakit.integrations.transformers.EMATrainer "
                "or `class MyTrainer(EMATrainerMixin, Trainer)` to evaluate the EMA",
                stacklevel=2,
            )
        if self._attached:  # a new train() call: a new average, like the Trainer's new TrainerState
            self.averager = self._unattached.renewed()
        self.averager.attach(model, max_duration=Time(state.max_steps, TimeUnit.BATCH) if state.max_steps > 0 else None)
        self._attached = True
        self._tokens_seen = state.num_input_tokens_seen  # restored with the Trainer's state on a resume
        if state.global_step > 0:  # the Trainer restored its state from a checkpoint
            folder = resume_from or os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self._resume(Path(folder), state.global_step)
        # optimizer steps per epoch, as the Trainer counts them; after a resume at an epoch's last step the
        # EMA also counts that epoch's end, which the Trainer does not replay
        loader = kwargs.get("train_dataloader")
        if loader is not None and has_length(loader) and len(loader) > 0:
            accumulation = max(1, int(args.gradient_accumulation_steps))
            self.averager.set_duration(None, -(-len(loader) // accumulation))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        tokens, self._tokens_seen = state.num_input_tokens_seen - self._tokens_seen, state.num_input_tokens_seen
        self.averager.step(num_tokens=tokens)
        self._finish_window(kwargs, end_of_training=False)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The Trainer also calls on_epoch_end when max_steps cuts an epoch short; that is not an epoch's end.
        if state.epoch is not None and float(state.epoch).is_integer():
            self.averager.epoch_end()
            self._finish_window(kwargs, end_of_training=False)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        folder = Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and not folder.is_dir():
            raise RuntimeError(
                f"{type(self).__name__} cannot find the checkpoint folder the Trainer just wrote: {folder}"
            )
        if self.averager.started:
            if _partitioned(self.averager.model):  # every rank takes part in the gathers; rank 0 writes
                export_ema_weights(self.averager, folder / EMA_WEIGHTS_NAME, overwrite=True)
            elif get_rank() == 0 or not is_distributed():
                _write_averaged(self.averager, folder / EMA_WEIGHTS_NAME)
        target = state_to_save(self.averager, folder, EMA_STATE_NAME, args.should_save)
        if target is not None:  # under ZeRO-3 every rank saves its partitions
            write_state(self.averager, target, overwrite=True)  # checkpoint-N/ is written again when a step is redone

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._attached:
            self._finish_window(kwargs, end_of_training=True)
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None and os.path.isdir(best):
            # The Trainer has just loaded the best checkpoint's training weights; keep its EMA with them.
            saved = state_to_load(self.averager, Path(best), EMA_STATE_NAME)
            if saved is not None:
                self._load(saved)
            else:
                warnings.warn(
                    f"load_best_model_at_end: the best checkpoint {best} holds no "
                    f"{expected_states(self.averager, EMA_STATE_NAME)}; the EMA keeps "
                    "the average of the last step",
                    stacklevel=2,
                )

    # ------------------------------------------------------------------ helpers for the events
    def _finish_window(self, kwargs: dict[str, Any], end_of_training: bool) -> None:
        """BatchNorm of the average over the Trainer's training data, once the averager's window has closed."""
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            return
        run = self.bn_forward
        device = next((p.device for p in model.parameters()), torch.device("cpu"))

        def forward(module: nn.Module, batch: Any) -> None:
            batch = _to(batch, device)
            if run is not None:
                run(module, batch)
            elif isinstance(batch, dict):
                module(**batch)
            else:
                default_bn_forward(module, batch)

        loader = kwargs.get("train_dataloader")
        ordered = None if loader is None else FixedOrder(loader)  # the same batches wherever the run resumed
        self.averager.finish_window(ordered, model, forward, end_of_training=end_of_training)

    def _resume(self, folder: Path, global_step: int) -> None:
        path = state_to_load(self.averager, folder, EMA_STATE_NAME)
        if path is None:
            warnings.warn(
                f"resuming at step {global_step} from {folder}, which holds no "
                f"{expected_states(self.averager, EMA_STATE_NAME)}: the EMA starts a "
                "fresh average from the current weights (its half-life and ema_start count from here)",
                stacklevel=3,
            )
            return
        self._load(path)
        if self.averager.timestamp.batch != global_step:
            raise ValueError(
                f"{path} was saved at optimizer step {self.averager.timestamp.batch}, but the Trainer resumes at step "
                f"{global_step}; delete it to resume with a fresh average"
            )

    def _load(self, path: Path) -> None:
        read_state(self.averager, path)

    def _weights_for_eval(self, model: nn.Module | None, always: bool = False) -> AbstractContextManager[Any]:
        """The EMA weights in ``model`` once the average has started (with ``eval_with_ema`` or ``always``)."""
        if model is None or not ((self.eval_with_ema or always) and self._attached and self.averager.started):
            return nullcontext(model)
        return self.averager.average_parameters(model)


class EMATrainerMixin(_TrainerBase):
    """Trainer methods that run on the EMA of the Trainer's :class:`EMACallback`; put it before the Trainer class.

    ``class MyTrainer(EMATrainerMixin, Trainer)``. Without an ``EMACallback`` among the Trainer's callbacks
    it changes nothing. Why a mixin: Transformers gives callbacks neither the Trainer nor an event before
    ``evaluate()``/``save_model()`` (``on_evaluate`` fires after the evaluation), nor the folder
    ``train(resume_from_checkpoint=...)`` resumes from.

    - ``evaluate()`` (periodic ones during ``train()`` and direct calls) and ``predict()`` run inside
      ``ema.average_parameters(model)``: the EMA weights once the average has started, the training weights
      put back bit-exactly afterwards, also on errors.
    - ``save_model()`` (and ``push_to_hub()``) write the EMA weights as the model with
      ``EMACallback(save_ema_as_model=True)``. The checkpoints the Trainer writes during ``train()`` keep
      the training weights (resuming needs them), with the EMA beside them.
    - ``train(resume_from_checkpoint=path or True)`` tells the callback which folder the Trainer resumes from.
    """

    @property
    def ema_callback(self) -> AveragingCallback | None:
        """The Trainer's :class:`AveragingCallback` (EMA or SWA), or None; more than one is an error."""
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, AveragingCallback)]
        if len(found) > 1:
            names = " and ".join(type(cb).__name__ for cb in found)
            kinds = {type(cb.averager).__name__ for cb in found}
            why = "EMA and SWA do not compose" if len(kinds) > 1 else "one average per model"
            raise ValueError(
                f"a Trainer runs at most one averaging callback, this one has {len(found)}: {names} ({why})"
            )
        return found[0] if found else None

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        callback = self.ema_callback
        if callback is not None:
            resume = resume_from_checkpoint
            if resume is True:  # what Trainer.train resolves True to (it raises if there is none)
                output_dir = str(self.args.output_dir)
                resume = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
            callback._served_by_mixin = True
            callback._resume_from = resume if isinstance(resume, (str, os.PathLike)) else None
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        with self._ema_weights():
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def predict(self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test") -> Any:
        with self._ema_weights():
            return super().predict(test_dataset, ignore_keys, metric_key_prefix)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        callback = self.ema_callback
        # The Trainer's own saves during train() are checkpoints: they keep the training weights.
        if callback is None or not callback.save_ema_as_model or (_internal_call and self.is_in_train):
            super().save_model(output_dir, _internal_call)
            return
        if not (callback._attached and callback.averager.started):
            warnings.warn(
                "save_ema_as_model: the average has not started yet, so save_model writes the training weights",
                stacklevel=2,
            )
        with callback._weights_for_eval(self.model, always=True):
            super().save_model(output_dir, _internal_call)

    def _ema_weights(self) -> AbstractContextManager[Any]:
        callback = self.ema_callback
        return nullcontext() if callback is None else callback._weights_for_eval(self.model)


@final
class EMACallback(AveragingCallback):
    """An :class:`AveragingCallback` driving ``EMA(...)``: every argument but ``save_ema_as_model`` and
    ``eval_with_ema`` is :class:`emakit.EMA`'s, under the same name, with its default and its checks."""

    @derived_signature(EMA, _OWN)
    def __init__(self, *args: Any, save_ema_as_model: bool = False, eval_with_ema: bool = True, **kwargs: Any) -> None:
        super().__init__(EMA(*args, **kwargs), save_ema_as_model=save_ema_as_model, eval_with_ema=eval_with_ema)


@final
class SWACallback(AveragingCallback):
    """An :class:`AveragingCallback` driving ``SWA(...)``: every argument but ``bn_forward``, ``save_ema_as_model``
    and ``eval_with_ema`` is :class:`emakit.SWA`'s. The Trainer's scheduler stays in charge of the learning rate
    (``swa_lr`` is refused: it is what emakit's Trainer sets)."""

    @derived_signature(SWA, [keyword("bn_forward", None), *_OWN])
    def __init__(
        self,
        *args: Any,
        bn_forward: Callable[[nn.Module, Any], Any] | None = None,
        save_ema_as_model: bool = False,
        eval_with_ema: bool = True,
        **kwargs: Any,
    ) -> None:
        swa = SWA(*args, **kwargs)
        if swa.swa_lr is not None:
            raise ValueError(
                f"SWACallback(swa_lr={swa.swa_lr!r}): swa_lr is the learning rate emakit's Trainer sets; under the "
                "Transformers Trainer its scheduler sets it (pass torch's SWALR through optimizers=(...))"
            )
        super().__init__(swa, save_ema_as_model=save_ema_as_model, eval_with_ema=eval_with_ema, bn_forward=bn_forward)


class EMATrainer(EMATrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`EMATrainerMixin`: pass an :class:`EMACallback` in ``callbacks``."""


# ---------------------------------------------------------------------------------------------- helpers
def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict) or hasattr(batch, "items"):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _write_averaged(averager: Averager, path: Path) -> None:
    """The tensors the average holds, under each name the model gives them, in the model's dtypes: a frozen
    base (LoRA) is not copied into every checkpoint. Plain tensors (FSDP is refused), so rank 0 writes alone."""
    model_state = model_state_dict(averager.model)
    published = averager.published_model_state(model_state)
    entries = []
    for name in averager.tracked_keys(model_state):
        tensor: torch.Tensor = published[name].detach()
        entries.append(TensorEntry(name, tuple(tensor.shape), tensor.dtype, partial(torch.Tensor.detach, tensor)))
    write_safetensors(entries, path, overwrite=True)  # checkpoint-N/ is written again when a step is redone


def _partitioned(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors) or DeepSpeed ZeRO-3 partitions."""
    return any(isinstance(p, dtensor_class()) or hasattr(p, "ds_status") for p in model.parameters())


def _refuse_unsupported(args: TrainingArguments, model: nn.Module | None) -> None:
    """Refuse, before training, the configurations whose EMA this callback would get wrong.

    ``args`` are checked when the Trainer is built; the model (wrapped by then) when training starts, which
    also catches FSDP1 configured through ``accelerate launch`` rather than the arguments. DeepSpeed ZeRO-3
    (each rank averages its partitions, parallel/zero.py) and a model sharded with ``fully_shard`` before the
    Trainer sees it (each rank averages its DTensor shards) are supported.
    """
    if args.fsdp:
        raise ValueError(
            f"emakit's averaging callbacks do not support the Trainer's FSDP (TrainingArguments.fsdp={args.fsdp!r}): "
            "Accelerate's FSDP plugin shards the model where callbacks cannot follow it and writes checkpoints "
            "that do not hold the EMA's shards. Supported: one device, DDP, DeepSpeed ZeRO 0-3 "
            "(TrainingArguments.deepspeed), and a model sharded with torch.distributed.fsdp.fully_shard before it "
            "is given to the Trainer (leave fsdp unset)"
        )
    if model is None:
        return
    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ValueError(
            "emakit's averaging callbacks do not support FSDP1: the Trainer's model is wrapped in "
            "FullyShardedDataParallel, whose flat parameters the EMA cannot follow. Shard the model with "
            "torch.distributed.fsdp.fully_shard (FSDP2) before giving it to the Trainer, or use DeepSpeed ZeRO-3"
        )
    sharded = next((name for name, p in model.named_parameters() if isinstance(p, dtensor_class())), None)
    save_strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    if sharded is not None and save_strategy != "no":
        raise ValueError(
            f"TrainingArguments.save_strategy={save_strategy!r} with a model sharded by fully_shard (parameter "
            f"{sharded!r} is a DTensor): the Trainer's checkpoints call save_model on the saving rank alone, which "
            "gathers the DTensors in a collective the other ranks never join, so the first checkpoint hangs (and "
            "the saving rank would write its own shards of the optimizer's state alone). Set save_strategy='no'; "
            "the EMA still trains, evaluates and exports (emakit.export_ema_weights(callback, path) on every rank)"
        )
