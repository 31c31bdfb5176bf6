"""The one averager: a moving average of a model's weights, driven by any training loop, whatever its rule.

:class:`Averager` holds every verb and knows nothing of any trainer: emakit's Trainer, the Lightning and
Transformers callbacks and Accelerate map their events onto these verbs. What varies between EMA, SWA and other
rules is the :mod:`~emakit.averaging.schedules` object handed to it; :class:`~emakit.averaging.EMA` and
:class:`~emakit.averaging.SWA` only turn their arguments into one. Each verb delegates to the part that does
that job: :mod:`.tracked` (which tensors, wherever they are), :mod:`.averages` (storages, update), :mod:`.guard`
(NaN/Inf), :mod:`.snapshots`, :mod:`.swap` (eval swap, ``ema_model``), :mod:`.states` and :mod:`.batchnorm`.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emakit.averaging import batchnorm, epochs, momentum, replicated, states
from emakit.averaging.averages import Averages
from emakit.averaging.config import Options, check_at_attach, check_eval_average
from emakit.averaging.guard import finite_or_skip
from emakit.averaging.rulestate import RuleState
from emakit.averaging.schedules import Schedule, check_batches_per_epoch, check_duration
from emakit.averaging.selection import Selection
from emakit.averaging.snapshots import SnapshotSeries
from emakit.averaging.swap import Swap
from emakit.averaging.tracked import TrackedModel
from emakit.averaging.writeback import OptimizerHook, WriteBack
from emakit.engine.storage import FlatStorage
from emakit.time import Time, Timestamp, TimeUnit

__all__ = ["Averager"]


class Averager(ABC):
    """A moving average of a model's weights under a :class:`~emakit.averaging.schedules.Schedule` (abstract).

    The concrete averagers, :class:`~emakit.averaging.EMA` and :class:`~emakit.averaging.SWA`, each define only
    ``__init__`` (their arguments, checked, made into a schedule, then :meth:`_configure`) and ``__repr__``.
    """

    @abstractmethod
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Check the averager's own arguments and call :meth:`_configure` with the schedule they make."""

    def _configure(self, schedule: Schedule, options: Options, selection: Selection, bn_update: bool) -> None:
        """The state every averager starts with (called once, by the concrete class's ``__init__``)."""
        #: When the average starts, updates and stops, and each update's weight: the one owner of those facts.
        self.schedule = schedule
        self.fp32_ema, self.skip_nonfinite = options.fp32_ema, options.skip_nonfinite
        self.flatten_model, self.overlap = options.flatten_model, options.overlap
        self.snapshot_interval: Time | None = options.snapshot_interval
        self.snapshot_folder: Path | None = options.snapshot_folder
        self.snapshot_dtype = options.snapshot_dtype
        self._eval_average = options.eval_average
        #: Whether the adapters recompute BatchNorm statistics of the average when its window closes.
        self.bn_update = bn_update

        #: The averager's clock: optimizer steps (``batch``), samples and epochs counted by :meth:`step` and
        #: :meth:`epoch_end` (or set by a trainer). Saved in :meth:`state_dict`.
        self.timestamp = Timestamp()
        self.max_duration: Time | None = None
        self.batches_per_epoch: int | None = None
        #: How many models the average holds: 1 at the start (a copy), +1 per update; 0 before the start.
        self.n_averaged = 0
        #: The clock's count (in the update unit) when the average started; None before.
        self.start_count: int | None = None
        self.num_skipped_nonfinite = 0
        #: The window has closed (the average no longer moves), and BatchNorm was recomputed since.
        self.window_closed = False
        self.bn_updated = False
        self._tracked = TrackedModel(selection)
        self._averages = Averages(schedule.num_averages)
        self._swap = Swap(self._tracked)
        self._snapshots = SnapshotSeries(options.snapshot_raw)  # raw: the training weights too
        self._rule = RuleState(schedule)  # what the schedule keeps beyond n: amounts seen, BEMA's theta_0
        #: Writing the average back into the training weights (:meth:`write_back`); by default nothing is.
        self.writeback = WriteBack()
        #: Reads the training tensors; FlatStorage keeps its update plan while this same reader is passed.
        self._live_reader: Callable[[], list[torch.Tensor]] | None = None
        #: The model's NaN/Inf values as attached (a -inf mask), by name: the guard's reference before the start.
        self._baseline: dict[str, torch.Tensor] = {}
        self._loaded_epoch_open = False  # a state was loaded and the clock has not moved since: set_duration
        #: Counts changes of the average, so that ``ema_model`` refreshes its cast copies only when needed.
        self._version = 0

    # ------------------------------------------------------------------ what the average is
    @property
    def update_interval(self) -> Time:
        """Time between updates (the schedule's)."""
        return self.schedule.update_interval

    @property
    def eval_average(self) -> int:
        """Which tracked average is evaluated, published and exported (an index, default 0)."""
        return self._eval_average

    @eval_average.setter
    def eval_average(self, index: int) -> None:
        check_eval_average(index, self.schedule.num_averages)
        if self._swap.swapped is not None:
            raise RuntimeError("eval_average cannot change while the averaged weights are swapped into a model")
        if index != self._eval_average:
            self._swap.forget_ema_model()  # built over the other average's storage
            self._eval_average = index

    @property
    def started(self) -> bool:
        """Whether the average exists (it starts as a copy of the weights at the schedule's start)."""
        return self._averages.storages is not None and self.start_count is not None

    @property
    def ema_weights_active(self) -> bool:
        """Whether the averaged weights are in a model now (between get_ema_model and get_training_model)."""
        return self._swap.swapped is not None

    @property
    def model(self) -> nn.Module:
        """The model this averager follows (as given to :meth:`attach`, wrappers included)."""
        if self._tracked.model is None:
            raise RuntimeError(f"this {type(self).__name__} follows no model yet: call attach(model) first")
        return self._tracked.model

    def follows(self, model: nn.Module) -> bool:
        """Whether ``model`` is the followed model (wrappers such as DDP or ``torch.compile`` aside)."""
        return self._tracked.is_own(model)

    @property
    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by canonical name (live views of the storage, fp32 for low-precision models)."""
        return self._evaluated().state_dict()

    @property
    def storage(self) -> FlatStorage:
        """The evaluated average's flat buffers (``nbytes``, ``tensors``, ``buffers``), once started."""
        return self._evaluated()

    def require_started(self) -> None:
        """Raise RuntimeError, saying when the average will start, unless it has started."""
        if not self.started:
            hint = epochs.not_started_hint(type(self).__name__, self.schedule, self.timestamp)
            raise RuntimeError(self.schedule.not_started_message() + hint)

    def _evaluated(self) -> FlatStorage:
        """The evaluated average's storage, once started and with no update pending."""
        self.require_started()
        assert self._averages.storages is not None
        self.wait()
        storage = self._averages.storages[self._eval_average]
        return self._rule.evaluated(storage, self._swap.training_tensors, self.n_averaged)

    def renewed(self) -> Averager:
        """A new averager of this kind and settings, for a new run (own snapshot run id); before any attach."""
        if self._tracked.model is not None:
            raise RuntimeError(f"renewed() copies a {type(self).__name__} that follows no model yet")
        fresh = copy.deepcopy(self)
        fresh._snapshots = SnapshotSeries(self._snapshots.raw)
        return fresh

    # ------------------------------------------------------------------ following a model
    def attach(
        self,
        model: nn.Module,
        *,
        max_duration: str | Time | None = None,
        batches_per_epoch: int | None = None,
    ) -> None:
        """Follow ``model``: the tensors the selection picks (``params``, ``buffers``), paired by canonical name.

        ``max_duration`` (``'Nba'``, ``'Nep'`` or ``'Nsp'``) is the length of training, needed only for
        ``'dur'`` times such as ``ema_start='0.5dur'``; ``batches_per_epoch`` lets an epoch ``max_duration``
        count the current epoch fractionally. Either can be given later with :meth:`set_duration`.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if self._tracked.model is not None and not self._tracked.is_own(model):
            raise RuntimeError(f"this {type(self).__name__} already follows another model; use one per model")
        if max_duration is not None or batches_per_epoch is not None:
            self.set_duration(max_duration, batches_per_epoch)
        self.wait()  # flattening re-points the tensors a pending update reads
        storages = self._averages.storages
        self._tracked.attach(model, self.flatten_model, storages[0].names if storages is not None else None)
        self._live_reader = self._tracked.live
        self._baseline = self._tracked.nonfinite_baseline()
        self._averages.prepared = None  # it holds views of the previous model's weights
        self._setup_overlap()
        self.writeback.check_model(self._tracked)
        check_at_attach(self.snapshot_folder, self.fp32_ema, self._tracked, self.schedule, stacklevel=3)

    def set_duration(self, max_duration: str | Time | None, batches_per_epoch: int | None = None) -> None:
        """Tell the averager how long training is (for ``'dur'`` times), e.g. once a framework knows ``max_steps``.

        After :meth:`load_state_dict`, a ``batches_per_epoch`` equal to the state's ``batch_in_epoch`` means the
        checkpoint was written after an epoch's last batch, before its end: that :meth:`epoch_end` is run here."""
        if max_duration is not None:
            self.max_duration = check_duration(max_duration, self.schedule)
        if batches_per_epoch is not None:
            self.batches_per_epoch = check_batches_per_epoch(batches_per_epoch)
        self.schedule = momentum.with_length(self.schedule, self.max_duration, self.batches_per_epoch)
        if self._loaded_epoch_open and batches_per_epoch and batches_per_epoch == self.timestamp.batch_in_epoch:
            self.epoch_end()

    def wait(self) -> None:
        """Finish the pending overlapped update (``overlap=True``: see :mod:`emakit.engine.overlap`); else a no-op."""
        self._averages.wait()

    # ------------------------------------------------------------------ the clock
    def step(self, num_samples: int = 0, num_tokens: int = 0) -> bool:
        """Count one optimizer step (of ``num_samples`` samples and ``num_tokens`` tokens, for ``'sp'`` / ``'tok'``
        times); call it after each one. With ``'ba'`` units the average starts (as a copy of the weights) once the
        schedule's start is reached and then blends every ``update_interval``. Returns whether it changed."""
        self._swap.refuse_step()
        epochs.check_step(
            type(self).__name__, self.schedule, self.timestamp, self.batches_per_epoch, num_samples, num_tokens
        )
        self.timestamp.advance_batch(num_samples, num_tokens)
        return self.tick(TimeUnit.BATCH)

    def epoch_end(self) -> bool:
        """Count one finished epoch; with ``'ep'`` units this is when the average starts or blends."""
        self.timestamp.advance_epoch()
        return self.tick(TimeUnit.EPOCH)

    def tick(self, unit: TimeUnit) -> bool:
        """Start, blend or close the average if due at the clock's time in ``unit``, then write it back if due.

        :meth:`step` and :meth:`epoch_end` call this after advancing the clock; a trainer that keeps the
        clock itself (sets :attr:`timestamp`) calls it directly. Returns whether the average changed.
        """
        self._loaded_epoch_open = False  # the clock moved on: a resume's epoch boundary is settled
        changed = unit == self.update_interval.unit and not self.window_closed and self._advance(unit)
        self.writeback.after_tick(self, unit, changed)
        return changed

    def _advance(self, unit: TimeUnit) -> bool:
        """:meth:`tick`'s work in the update unit: start, blend or close the average (write-back aside)."""
        if self._tracked.model is None:
            var = type(self).__name__.lower()
            raise RuntimeError(f"call {var}.attach(model) before the first {var}.step()")
        if self.snapshot_folder is not None:
            self._snapshots.check_once(self.snapshot_folder, self._tracked.device)
        count = self.timestamp.get(unit)
        changed = False
        if not self.started:
            if self.schedule.start_due(self.timestamp, self.max_duration, self.batches_per_epoch):
                if self._tracked.start():  # the set is fixed now
                    self._forget_made_for_set()
                if finite_or_skip(self, count):
                    self._initialise(count)
                    changed = True
        elif self.schedule.update_due(count) and finite_or_skip(self, count):
            self.update()
            changed = True
        if changed and self.snapshot_interval is not None and count % int(self.snapshot_interval.value) == 0:
            self.write_snapshot()
        if self.started and self.schedule.end_reached(self.timestamp, self.max_duration, self.batches_per_epoch):
            self.window_closed = True
        return changed

    def write_back(
        self,
        every: str | Time | None = None,
        pull: float | None = None,
        *,
        average: int | None = None,
        optimizer_state: str | OptimizerHook = "keep",
    ) -> Averager:
        """Write the average back into the training weights from now on (see :mod:`.writeback`); returns self."""
        self.writeback = WriteBack.checked(every, pull, average, optimizer_state, self.schedule, self._tracked)
        return self

    def close_window(self) -> None:
        """Stop averaging now: later steps leave the average as it is."""
        self.window_closed = True

    # ------------------------------------------------------------------ starting and updating the average
    def _initialise(self, count: int) -> None:
        """Start (or restart) every average as a copy of the training weights, at ``count``."""
        self.wait()
        sources = dict(zip(self._tracked.names, self._swap.training_tensors(), strict=True))
        self._snapshots.started(self._tracked.as_model_tensors(sources))
        if self._averages.start(sources, self.fp32_ema):
            self._swap.forget_ema_model()
        self._rule.start(self.schedule, sources, self.timestamp)
        self.start_count, self.n_averaged = count, 1
        self._version += 1

    def update(self) -> None:
        """Blend the training weights into the average once, now (:meth:`step` calls this when it is due)."""
        self.require_started()
        self.wait()
        source: Callable[[], list[torch.Tensor]] | list[torch.Tensor] | None = self._live_reader
        if source is None or self._tracked.sharded or self._swap.swapped is not None:
            source = self._swap.training_tensors()  # a reusable plan only for plain models
        self._averages.blend(source, self._rule.weights(self.schedule, self.n_averaged + 1, self.timestamp))
        self._averages.copy_buffers(self._tracked.names, self._tracked.copied, self._swap.training_tensors)
        self.n_averaged += 1
        self.bn_updated = False  # the blend moved the BatchNorm buffers away from the recomputed statistics
        self._version += 1

    def _forget_made_for_set(self) -> None:
        """The tracked set changed: drop the storages, ``ema_model`` and overlap phases made for the former one."""
        self._averages.drop()
        self._rule.drop()
        self._swap.forget_ema_model()
        self._setup_overlap()

    def _setup_overlap(self) -> None:
        """With ``overlap``, which tracked tensors are blended alongside the next step."""
        if self.overlap and self._tracked.model is not None:
            self._averages.setup_overlap(self._tracked.model, self._tracked.names, self._tracked.live())

    def write_snapshot(self) -> Path:
        """Write the averages (and, with ``snapshot_raw``, the weights) as the series' next snapshot (:mod:`.snapshots`)."""
        self.require_started()
        if self.snapshot_folder is None:
            raise RuntimeError(
                f"this {type(self).__name__} has no snapshot_folder: pass snapshot_folder and snapshot_interval"
            )
        self._snapshots.check_once(self.snapshot_folder, self._tracked.device)
        self.wait()
        return self._snapshots.write(
            self.snapshot_folder,
            self._averages.as_model_tensors(self._tracked),
            self.schedule.profiles,
            t=self.n_averaged,
            step=self.timestamp.batch,
            update_interval=self.update_interval,
            dtype=self.snapshot_dtype,
            raw=self._swap.training_model_tensors,
        )  # step() calls this every snapshot_interval; under FSDP every rank writes its shards, else rank 0 one file

    # ------------------------------------------------------------------ swapping weights
    def get_ema_model(self, model: nn.Module) -> nn.Module:
        """Put the averaged weights into ``model`` (matched by canonical name, cast to its dtypes) and return it.

        The training weights are kept aside until :meth:`get_training_model`. A no-op if ``model`` already
        holds the averaged weights. Prefer :meth:`average_parameters`, which always swaps back.
        """
        return self._swap.put_in(model, self._evaluated())

    def get_training_model(self, model: nn.Module) -> nn.Module:
        """Put the training weights back into ``model`` and return it; a no-op if they are already there."""
        if self._swap.is_swapped_out(model):
            self.wait()
        return self._swap.take_out(model)

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Within the block, ``model`` (default: the attached one) holds the averaged weights; yields it.

        Before the average has started the model keeps its training weights (there is no average yet to
        evaluate). On leaving the block, also through an exception, the training weights are put back
        exactly as they were. Nested use on the same model is a no-op inside. No optimizer step belongs inside:
        :meth:`step` raises there, and parameters changed in place there raise once the training weights are back.
        """
        target = self.model if model is None else model
        if not self.started or self._swap.swapped is not None:
            yield target
            return
        storage = self._evaluated()
        self._swap.put_in(target, storage)
        with self._swap.block(target, storage, self.wait):  # swaps back, then names what changed inside
            yield target

    @property
    def ema_model(self) -> nn.Module:
        """A module of the model's structure holding the average: eval mode, no gradients. Live storage:
        when the model's dtypes are the average's, its tensors are the storage itself (no copy; it follows
        the average), so writing to them writes the average: a train-mode forward (``ema_model.train()``)
        moves the average's BatchNorm statistics. For an fp16/bf16 model with ``fp32_ema`` it is in the model's
        dtype, refreshed from the fp32 average each time this property is read. Frozen parameters are shared.
        """
        return self._swap.ema_model(self._evaluated(), self._version + self._rule.refreshes)

    # ------------------------------------------------------------------ BatchNorm of the average
    def update_bn(
        self,
        loader: Iterable[Any],
        model: nn.Module | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        """Recompute the average's BatchNorm statistics: one pass of the averaged weights over ``loader``.

        As ``torch.optim.swa_utils.update_bn``: the running statistics are reset and accumulated with momentum
        None (an equal-weight mean over the batches), the model in train mode, and stored in the average, so
        evaluation, ``ema_model``, checkpoints and exports all use them; the training weights, and the random
        state of the loader and of torch, are left as they were. ``forward(model, batch)`` runs a batch (default:
        the model on the first element of a list or tuple batch, else on the batch). BEMA refuses (see its error)."""
        target = self.model if model is None else model
        self._rule.refuse_update_bn(type(self).__name__)
        self.require_started()
        with self.average_parameters(target):
            batchnorm.recompute(target, loader, forward, self._evaluated(), self._tracked)
        self.bn_updated = True
        self._version += 1

    def finish_window(
        self,
        loader: Iterable[Any] | None,
        model: nn.Module | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        *,
        end_of_training: bool = False,
    ) -> bool:
        """What adapters call after each update event and at the end of training: at the end of training, close
        a window that closes then (SWA's); once the window is closed, recompute BatchNorm over ``loader`` once
        (if ``bn_update`` and the model has BatchNorm). Returns whether BatchNorm was recomputed now."""
        if end_of_training and self.started and self.schedule.closes_at_end_of_training:
            self.window_closed = True
        if not (self.window_closed and self.bn_update and self.started and not self.bn_updated) or loader is None:
            return False
        self.update_bn(loader, model, forward)
        return True

    # ------------------------------------------------------------------ model states for checkpoints
    def published_model_state(self, model_state: Mapping[str, Any]) -> dict[str, Any]:
        """``model_state`` (canonical names) with the average, in each tensor's dtype, for the tracked tensors.

        What checkpoints publish and exports write as "the averaged model"; sharded tensors stay sharded. The
        training weights are used for tensors the average does not track (frozen parameters).
        """
        storage = self._evaluated()
        training = self.training_model_state(model_state)
        return states.published_model_state(self._tracked, model_state, training, storage)

    def training_model_state(self, model_state: Mapping[str, Any]) -> dict[str, Any]:
        """``model_state`` with the training weights for the tracked tensors, even while the average is swapped in."""
        self.wait()
        return states.training_model_state(self._tracked, model_state, self._swap.training_backup())

    def tracked_keys(self, model_state: Mapping[str, Any]) -> list[str]:
        """The keys of ``model_state`` holding a tracked tensor: its own names and tied weights' other names."""
        return [key for key, _ in states.keys_of_tracked(self._tracked, model_state)]

    # ------------------------------------------------------------------ state for resuming
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs: the average (fp32 master), counters and the clock.

        As with torch's, the tensors are references to the live average: a state kept in memory (not saved)
        must be ``copy.deepcopy``-ed, or its tensors follow later updates while its counters do not."""
        self.wait()
        state = states.averager_state(
            started=self.started,
            start_count=self.start_count,
            n_averaged=self.n_averaged,
            schedule=self.schedule,
            num_skipped_nonfinite=self.num_skipped_nonfinite,
            timestamp=self.timestamp,
            averages=self._averages.as_model_tensors(self._tracked) if self.started else [],
            snapshots=self._snapshots,
            window_closed=self.window_closed,
            bn_updated=self.bn_updated,
            rank_buffers=replicated.rank_entry(self._tracked, self._averages.storages, self._swap.training_backup()),
        )
        self.writeback.save(state)
        return self._rule.save(self.schedule, state, self._tracked)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`attach`); everything is checked before anything changes."""
        if not isinstance(state, Mapping):
            raise TypeError(f"{type(self).__name__} state must be a dict, got {type(state).__name__}")
        if self._tracked.model is None:
            raise RuntimeError(f"attach the {type(self).__name__} to its model (attach(model)) before loading a state")
        self.wait()
        saved = state.get("ema") if state.get("started") else None
        former = self._tracked.select_saved(saved) if isinstance(saved, Mapping) else None
        try:
            restored = states.read_state(state, self._tracked, self.schedule, stacklevel=3)
            kept = self._rule.read(self.schedule, state, self._tracked)
            written = WriteBack.read(state)
            if self.snapshot_folder is not None:  # refuses a folder holding another run's snapshots
                self._snapshots.check_folder(self.snapshot_folder, restored.snapshot_run, self._tracked.device())
        except BaseException:
            if former is not None:
                self._tracked.reselect(former)
            raise
        if former is not None:
            self._forget_made_for_set()
        if self._averages.restore(restored.averages, restored.live, self.fp32_ema):
            self._swap.forget_ema_model()
        self._rule.restore(kept, self._tracked)
        self.writeback.restore(written)
        self.start_count, self.n_averaged = restored.start_count, restored.n_averaged
        self.num_skipped_nonfinite = restored.num_skipped_nonfinite
        self.window_closed, self.bn_updated = restored.window_closed, restored.bn_updated
        if restored.timestamp is not None:
            self.timestamp = restored.timestamp
        self._snapshots.restore(restored.snapshot_index, restored.snapshot_run, restored.snapshot_start)
        self._loaded_epoch_open = True  # see set_duration
        if self.snapshot_folder is not None:
            # snapshots written after the resumed point are moved aside: their updates are redone
            self._snapshots.resume(self.snapshot_folder, self.n_averaged, stacklevel=3)
        self._version += 1
