"""Writing the average back into the training weights: Switch-EMA's copy and a per-update pull.

Configured on any averager with :meth:`~emakit.averaging.averager.Averager.write_back`; the averager's
:meth:`~emakit.averaging.averager.Averager.tick` calls :meth:`WriteBack.after_tick`, so every front end that steps
the averager writes back. Two rules, alone or together:

- ``every`` (a copy, Switch-EMA): ``theta <- average`` once ``every`` has passed since the average started or
  since the last copy, in ``'ba'`` (optimizer steps, a multiple of ``update_interval``) or ``'ep'`` (epoch ends);
- ``pull`` (strength ``lambda`` in (0, 1]): ``theta <- theta + lambda * (average - theta)`` after every update
  of the average (not at its start, where the two are equal); ``pull=1`` is a copy after every update.

What is written: the tracked floating tensors the average blends (trainable parameters and averaged buffers),
from the average ``average`` (default the evaluated one, ``eval_average``; BEMA's bias-corrected weights). Frozen
or untracked tensors, integer buffers and buffers of policy ``'copy'`` keep their training values. Every rank
writes its own tensors from its own average: under DDP the ranks hold the same average and stay identical;
under FSDP2 each rank writes its shards of the DTensor parameters from its shards of the average, with no
communication. A DeepSpeed ZeRO-3 model is refused (its training weights are the optimizer's fp32 master
partitions, which the next step would write over the copy).

The optimizer's state after a copy (``optimizer_state``): ``'keep'`` (default: moments and step counts stay, as
Keras's ``ema_overwrite_frequency`` and ema-pytorch's ``update_model_with_ema_every`` leave them), ``'reset'``
(the per-parameter state of the written parameters is removed from every optimizer that steps them, so each
starts afresh at its next step: Adam's moments from zero and its step count from 1), or a callable
``hook(params, optimizers)`` given the written parameters by canonical name and those optimizers. The
optimizers are found by a global optimizer step post-hook (installed once, when ``'reset'`` or a hook is
configured) that keeps, weakly, every optimizer that stepped. A pull keeps the optimizer's state.

The copies' phase (the clock's count at the last copy or the start) and the counts of copies and pulls are
saved in the averager's state (``write_back``), so a resumed run writes back exactly when the uninterrupted one
does.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from emakit.averaging.schedules import UPDATE_UNITS, Schedule
from emakit.averaging.tracked import TrackedModel
from emakit.engine.kernels import grouped_pairs, lerp_grouped_
from emakit.engine.memory import data_ptrs
from emakit.engine.storage import FlatStorage
from emakit.time import Time, TimeUnit

if TYPE_CHECKING:
    from emakit.averaging.averager import Averager

__all__ = ["OptimizerHook", "WriteBack", "optimizers_stepping"]

#: ``optimizer_state=hook``: called after each copy with the written parameters by name and their optimizers.
OptimizerHook = Callable[[dict[str, torch.Tensor], list[torch.optim.Optimizer]], None]
OPTIMIZER_STATES = ("keep", "reset")
#: The names written and the (training, average) pairs grouped into multi-tensor kernels.
_Pairs = tuple[set[str], list[tuple[list[torch.Tensor], list[torch.Tensor]]]]

_stepped: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
_watching = False


def _seen(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _stepped.add(optimizer)


def _watch_optimizers() -> None:
    """Keep (weakly) every optimizer that steps from now on; one global hook, installed once, never removed."""
    global _watching
    if not _watching:
        register_optimizer_step_post_hook(_seen)
        _watching = True


def optimizers_stepping(params: Mapping[str, torch.Tensor]) -> list[torch.optim.Optimizer]:
    """The optimizers seen stepping since write-back watched them that hold any of ``params``."""
    ids = {id(p) for p in params.values()}
    return [o for o in list(_stepped) if any(id(p) in ids for group in o.param_groups for p in group["params"])]


class WriteBack:
    """A write-back configuration and where it stands: the phase of the copies and the counts.

    ``WriteBack()`` writes nothing (an averager's default); :meth:`checked` makes one from the user's arguments.
    """

    def __init__(
        self,
        every: Time | None = None,
        pull: float | None = None,
        average: int | None = None,
        optimizer_state: str | OptimizerHook = "keep",
    ) -> None:
        self.every, self.pull, self.average, self.optimizer_state = every, pull, average, optimizer_state
        if optimizer_state != "keep":
            _watch_optimizers()
        #: The clock's count in ``every``'s unit at the average's start or the last copy; None before the start.
        self.last: int | None = None
        self.num_copies = 0
        self.num_pulls = 0
        #: The last write's pairs (see :meth:`_pairs`): their key, the objects it names by id, the pairs.
        self._kept: tuple[tuple[Any, ...], tuple[Any, ...], _Pairs] | None = None

    @property
    def active(self) -> bool:
        """Whether anything is written back."""
        return self.every is not None or self.pull is not None

    @classmethod
    def checked(
        cls,
        every: str | Time | None,
        pull: float | None,
        average: int | None,
        optimizer_state: str | OptimizerHook,
        schedule: Schedule,
        tracked: TrackedModel,
    ) -> WriteBack:
        """A write-back from :meth:`~emakit.averaging.averager.Averager.write_back`'s arguments, each checked
        (against the followed model too, if one is attached)."""
        if every is None and pull is None:
            raise ValueError(
                "write_back: give every= (copy the average into the training weights every so often, e.g. '1ep' or "
                "'500ba'), pull= (pull them toward it after every update, a strength in (0, 1]) or both; got neither"
            )
        parsed = None if every is None else _check_every(every, schedule.update_interval)
        if pull is not None and (
            isinstance(pull, bool) or not isinstance(pull, numbers.Real) or not 0 < float(pull) <= 1
        ):
            raise ValueError(f"write_back: pull must be a number in (0, 1] (1 copies after every update), got {pull!r}")
        n = schedule.num_averages
        if average is not None and (isinstance(average, bool) or not isinstance(average, int) or not 0 <= average < n):
            raise ValueError(
                f"write_back: average must be None (the evaluated average, eval_average) or an index into the {n} "
                f"tracked average(s), got {average!r}"
            )
        if not callable(optimizer_state) and optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(
                "write_back: optimizer_state must be 'keep', 'reset' or a callable hook(params, optimizers), "
                f"got {optimizer_state!r}"
            )
        if optimizer_state != "keep" and parsed is None:
            raise ValueError(
                f"write_back: optimizer_state={optimizer_state!r} applies to the copies of every=; a pull keeps the "
                "optimizer's state: give every= too, or leave optimizer_state='keep'"
            )
        checked = cls(parsed, None if pull is None else float(pull), average, optimizer_state)
        checked.check_model(tracked)
        return checked

    def __repr__(self) -> str:
        shown = [f"every='{self.every}'"] if self.every is not None else []
        shown += [f"pull={self.pull!r}"] if self.pull is not None else []
        shown += [f"average={self.average}"] if self.average is not None else []
        shown += [f"optimizer_state={self.optimizer_state!r}"] if self.optimizer_state != "keep" else []
        return f"WriteBack({', '.join(shown)})"

    def acts_on(self, unit: TimeUnit) -> bool:
        """Whether a tick in ``unit`` may copy (a trainer ticks this unit besides the update unit)."""
        return self.every is not None and self.every.unit == unit

    def check_model(self, tracked: TrackedModel) -> None:
        """RuntimeError for a model whose tracked tensors are not the trained weights (DeepSpeed ZeRO-3)."""
        if self.active and tracked.zero3:
            raise RuntimeError(
                "write_back is not supported for a DeepSpeed ZeRO-3 model: its training weights are the "
                "optimizer's fp32 master partitions, which the next optimizer step writes over the model's "
                "partitions, so a copy of the average into the model would be lost. Write back under DDP or FSDP2"
            )

    def after_tick(self, averager: Averager, unit: TimeUnit, updated: bool) -> None:
        """Copy or pull if due at the clock's time, after the tick in ``unit`` (``updated``: the average moved)."""
        if not self.active or not averager.started:
            return
        if self.every is not None:
            now = averager.timestamp.get(self.every.unit)
            if self.last is None:  # the average started at this tick (or write-back was configured since)
                self.last = now
            elif unit == self.every.unit and now - self.last >= self.every.value:
                self.last = now
                written = self._write(averager, 1.0)
                self.num_copies += 1
                if self.optimizer_state != "keep":
                    self._optimizer_after_copy(averager._tracked, written)
                return
        if self.pull is not None and updated and averager.n_averaged > 1:
            self._write(averager, self.pull)
            self.num_pulls += 1

    @torch.no_grad()
    def _write(self, averager: Averager, weight: float) -> set[str]:
        """``theta <- theta + weight * (average - theta)`` for the written tensors; returns their names."""
        averager.wait()
        tracked = averager._tracked
        self.check_model(tracked)
        storages = averager._averages.storages
        assert storages is not None
        index = averager.eval_average if self.average is None else self.average
        source = averager._rule.evaluated(storages[index], averager._swap.training_tensors, averager.n_averaged)
        training = averager._swap.training_tensors()  # the backup while the average is swapped in
        written, groups = self._pairs(tracked, source, training)
        lerp_grouped_(groups, weight)
        return written

    def _pairs(self, tracked: TrackedModel, source: FlatStorage, training: list[torch.Tensor]) -> _Pairs:
        """The written names and the (training, average) pairs grouped into multi-tensor kernels.

        Kept while the same tensors hold the same memory in the same dtypes: pairing and grouping many small
        tensors costs more than their kernels. The kept entry holds every object its key names by id, so no
        other object can take one of those ids while it is kept."""
        pointers = data_ptrs(training)
        held = (source, tracked.names, tracked.copied, training)
        key = (tuple(map(id, held[:3])), tuple(map(id, training)), tuple(t.dtype for t in training), pointers)
        if pointers is None or self._kept is None or self._kept[0] != key:
            written = set(source.averaged) - set(tracked.copied)
            pairs = [(t, source.tensors[n]) for n, t in zip(tracked.names, training, strict=True) if n in written]
            targets, sources = [t for t, _ in pairs], [s for _, s in pairs]
            self._kept = (key, held, (written, grouped_pairs(targets, sources)))
        return self._kept[2]

    def _optimizer_after_copy(self, tracked: TrackedModel, written: set[str]) -> None:
        """Apply ``optimizer_state`` to the written parameters (the model's: DTensors under FSDP2, the keys of
        the optimizers' state)."""
        params: dict[str, torch.Tensor] = {
            n: t
            for n, t in zip(tracked.names, tracked.model_tensors(), strict=True)
            if n in written and isinstance(t, torch.nn.Parameter)
        }
        optimizers = optimizers_stepping(params)
        if callable(self.optimizer_state):
            self.optimizer_state(params, optimizers)
            return
        if params and not optimizers:
            raise RuntimeError(
                "write_back(optimizer_state='reset'): no optimizer holding the written parameters has stepped since "
                "write_back was configured, so there is no state to reset; step the optimizer before the copy, or "
                "pass optimizer_state=hook(params, optimizers) to handle the state yourself"
            )
        for optimizer in optimizers:
            for p in params.values():
                optimizer.state.pop(p, None)

    # ------------------------------------------------------------------ state
    def save(self, state: dict[str, Any]) -> None:
        """Add where the write-back stands to the averager's ``state`` (nothing when nothing is written back)."""
        if self.active:
            state["write_back"] = {"last": self.last, "num_copies": self.num_copies, "num_pulls": self.num_pulls}

    @staticmethod
    def read(state: Mapping[str, Any]) -> tuple[int | None, int, int]:
        """The saved phase and counts of an averager's ``state``, checked (none saved: from now, no copies yet)."""
        saved = state.get("write_back")
        if saved is None:
            return None, 0, 0
        if not isinstance(saved, Mapping) or set(saved) != {"last", "num_copies", "num_pulls"}:
            raise ValueError(f"averager state: write_back must be a dict of last, num_copies, num_pulls, got {saved!r}")
        for key in ("num_copies", "num_pulls", "last"):
            value = saved[key]
            if not (value is None and key == "last") and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"averager state: write_back[{key!r}] must be an int, got {value!r}")
        return saved["last"], saved["num_copies"], saved["num_pulls"]

    def restore(self, read: tuple[int | None, int, int]) -> None:
        """Apply what :meth:`read` returned."""
        self.last, self.num_copies, self.num_pulls = read


def _check_every(every: str | Time, update_interval: Time) -> Time:
    """``every`` as a time in the update unit (a multiple of ``update_interval``) or in epochs over 'ba' updates."""
    parsed = Time.coerce(every, "write_back: every", UPDATE_UNITS, positive=True)
    if parsed.value <= 0 or not math.isfinite(parsed.value) or parsed.value != int(parsed.value):
        raise ValueError(f"write_back: every must be a whole number of 'ba' or 'ep' greater than 0, got '{parsed}'")
    if parsed.unit == update_interval.unit:
        if int(parsed.value) % int(update_interval.value):
            raise ValueError(
                f"write_back: every must be a multiple of update_interval='{update_interval}', got '{parsed}' "
                "(a copy between updates would write an average that has not moved since the last one)"
            )
    elif parsed.unit == TimeUnit.BATCH:
        raise ValueError(
            f"write_back: every='{parsed}' is in 'ba' but the average updates every '{update_interval}': give every "
            "in 'ep' (a multiple of the update interval), or update the average in 'ba'"
        )
    return parsed
