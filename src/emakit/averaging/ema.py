"""The EMA of a model's weights, driven by any training loop.

:class:`EMA` is the whole averaging as seen from outside: hyperparameters, when to start and blend (its
own clock), swapping the average in and out, and its state for an exact resume. It knows nothing of any
trainer: emakit's Trainer, the Lightning and Transformers callbacks each map their framework's events
onto its verbs (:meth:`EMA.attach`, :meth:`EMA.step`, :meth:`EMA.epoch_end`, :meth:`EMA.average_parameters`,
:meth:`EMA.state_dict` / :meth:`EMA.load_state_dict`) and add nothing else.

Each verb delegates to the module that does that job: :mod:`.config` (checking the arguments),
:mod:`.clock` (the schedule), :mod:`.tracked` (which tensors, wherever they are), :mod:`.averages` (the
storages and their update), :mod:`.guard` (NaN/Inf), :mod:`.snapshots`, :mod:`.swap` (eval swap,
``ema_model``) and :mod:`.states` (resume state, checkpoint model states). The parts are small objects
held by the EMA (composition rather than mixins), so that each one's state is in one place and the EMA
shows, verb by verb, which parts take part and in what order; the hyperparameters, counters and clock
stay on the EMA, where users and trainers read and set them. The one base class,
:class:`~emakit.averaging.former.FormerNames`, only keeps the private names callers used before the split.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emakit.averaging import states
from emakit.averaging.averages import Averages
from emakit.averaging.clock import check_batches_per_epoch, check_duration, start_due, update_due, update_weights
from emakit.averaging.config import (
    DEFAULT_HALF_LIFE,
    check_at_attach,
    check_eval_average,
    describe,
    not_started_message,
    parse_settings,
)
from emakit.averaging.former import FormerNames
from emakit.averaging.guard import nonfinite_baseline, skipped_message, training_weights_finite
from emakit.averaging.selection import BufferPolicy, Kept, ParamSelection, parse_selection
from emakit.averaging.snapshots import SnapshotSeries
from emakit.averaging.swap import Swap
from emakit.averaging.tracked import TrackedModel
from emakit.averaging.warmup import Warmup, check_warmup
from emakit.parallel.zero import refuse_snapshots
from emakit.posthoc.profiles import Profile
from emakit.time import Time, Timestamp, TimeUnit

__all__ = ["EMA"]


class EMA(FormerNames):
    """Keep an exponential moving average of a model's trainable parameters and buffers.

    Every ``update_interval`` the average moves toward the training weights,
    ``ema = smoothing * ema + (1 - smoothing) * weights`` with ``smoothing = 2 ** (-update_interval / half_life)``,
    so a weight's contribution halves every ``half_life``. Integer buffers are copied, not averaged.

    In any loop::

        ema = EMA(half_life="2000ba")
        ema.attach(model)                      # max_duration=... only for 'dur' times
        for epoch in range(epochs):
            for batch in loader:
                ...; optimizer.step()
                ema.step()                     # counts one optimizer step; starts or blends when due
            ema.epoch_end()                    # only needed for 'ep' units
            with ema.average_parameters():     # the EMA weights, once started; always swapped back
                evaluate(model)
        torch.save(ema.state_dict(), path)     # everything for an exact resume

    Args:
        half_life: time for a contribution to halve, in ``'ba'`` (optimizer steps) or ``'ep'`` (default
            ``'1000ba'``). Give ``smoothing`` instead to set the coefficient directly. A list tracks one
            average per half-life, all updated in one pass over the weights.
        sigma_rel: instead of half-lives, power-function profiles (EDM2's post-hoc EMA): each average's
            width is a fixed fraction ``sigma_rel`` of the training so far, in (0, 1/sqrt(12)). One value or
            a list (one average each). See :mod:`emakit.posthoc`.
        smoothing: the per-update coefficient in [0, 1]; excludes an explicit ``half_life``.
        ema_start: when the average starts, as a copy of the weights: ``'ba'``, ``'ep'``, ``'sp'`` or
            ``'dur'`` (a fraction of ``max_duration`` in [0, 1]). Default ``'0.0dur'`` (the first update).
        update_interval: time between updates, in half_life's unit (default 1 of it, or ``'1ba'`` with
            ``smoothing``). An interval longer than the half-life is allowed but warns: the average then
            barely smooths.
        fp32_ema: keep the average of fp16/bf16 tensors in fp32 (default). A 16-bit average stops moving
            once ``1 - smoothing`` is below the dtype's resolution. What users receive as the EMA model
            (:attr:`ema_model`, published checkpoints, exports) is still in the model's dtype; the fp32
            master stays in this object's state, so resuming is exact.
        skip_nonfinite: before each update, check the training weights for NaN/Inf and skip the update
            (with a warning, counted in ``num_skipped_nonfinite``) if any is found.
        flatten_model: at :meth:`attach`, re-point the model's parameters and buffers as views into one
            buffer per (device, dtype) (:func:`emakit.flatten.flatten_model_`), so that each update is one
            kernel per buffer. Off by default because it changes where the model's tensors live.
        overlap: run the parameters' part of each update alongside the next training step (CUDA side
            stream or CPU worker thread); see :mod:`emakit.overlap`. Off by default; one average only.
        snapshot_interval: with ``snapshot_folder``, write every tracked average to the folder every this
            often (in the update unit), for post-hoc reconstruction of any other EMA length
            (:func:`emakit.posthoc.reconstruct`). Written after the update at that time, atomically.
        snapshot_folder: where snapshots go (``snapshot-000000.safetensors``, ...; DCP directories for
            sharded models).
        snapshot_dtype: dtype of the snapshots' floating tensors: ``torch.float32`` (default) or
            ``torch.float16`` / ``torch.bfloat16`` to halve the disk.
        eval_average: which tracked average :meth:`average_parameters`, :attr:`ema_model`, checkpoints
            and exports use (an index into the averages, default 0).
        params: the parameters averaged: ``'trainable'`` (default; those requiring grad when the average
            starts), ``'all'``, glob patterns on canonical names, or a callable ``(name, tensor) -> bool``.
        buffers: floating buffers ``'average'`` (default), ``'copy'`` or ``'share'`` (not kept), or
            ``{pattern: policy}``. What is not kept costs no memory and is shared with the model; see
            :mod:`emakit.averaging.selection`.
        warmup: ramp the smoothing up early as timm and diffusers do: True or ``Warmup(gamma, power)`` (:mod:`.warmup`).
    """

    def __init__(
        self,
        half_life: str | Time | None = DEFAULT_HALF_LIFE,
        smoothing: float | None = None,
        ema_start: str | Time = "0.0dur",
        update_interval: str | Time | None = None,
        fp32_ema: bool = True,
        skip_nonfinite: bool = False,
        flatten_model: bool = False,
        overlap: bool = False,
        sigma_rel: float | Sequence[float] | None = None,
        snapshot_interval: str | Time | None = None,
        snapshot_folder: str | os.PathLike[str] | None = None,
        snapshot_dtype: torch.dtype = torch.float32,
        eval_average: int = 0,
        params: ParamSelection = "trainable",
        buffers: BufferPolicy = "average",
        warmup: bool | Warmup = False,
    ) -> None:
        settings = parse_settings(
            half_life,
            smoothing,
            ema_start,
            update_interval,
            fp32_ema,
            skip_nonfinite,
            flatten_model,
            overlap,
            sigma_rel,
            snapshot_interval,
            snapshot_folder,
            snapshot_dtype,
            eval_average,
            stacklevel=3,
        )
        self.half_life: Time | None = settings.half_life
        self.half_lives: list[Time] = settings.half_lives
        self.update_interval: Time = settings.update_interval
        #: One profile per tracked average; ``smoothings[j]`` is its constant coefficient (None for power profiles).
        self.profiles: list[Profile] = settings.profiles
        self.smoothings: list[float | None] = settings.smoothings
        #: The first average's constant coefficient (NaN for a power profile, whose coefficient changes).
        self.smoothing: float = settings.smoothing
        self.num_averages = settings.num_averages
        self._eval_average = settings.eval_average
        self.ema_start: Time = settings.ema_start
        self.fp32_ema, self.skip_nonfinite, self.num_skipped_nonfinite = settings.fp32_ema, settings.skip_nonfinite, 0
        self.flatten_model, self.overlap = settings.flatten_model, settings.overlap
        self.snapshot_interval: Time | None = settings.snapshot_interval
        self.snapshot_folder: Path | None = settings.snapshot_folder
        self.snapshot_dtype, self.warmup = settings.snapshot_dtype, check_warmup(warmup, sigma_rel, snapshot_folder)
        selection = parse_selection(params, buffers)

        #: The EMA's clock: optimizer steps (``batch``), samples and epochs counted by :meth:`step` and
        #: :meth:`epoch_end` (or set by the Trainer). Saved in :meth:`state_dict`.
        self.timestamp = Timestamp()
        self.max_duration: Time | None = None
        self.batches_per_epoch: int | None = None
        self.num_updates = 0
        self.start_count: int | None = None

        self._tracked = TrackedModel()
        self._averages = Averages(self.num_averages)
        self._swap = Swap(self._tracked)
        self._snapshots = SnapshotSeries()
        self._kept = Kept(selection, self._tracked, self._averages, self._swap)
        #: Reads the training tensors; FlatStorage keeps its update plan while this same reader is passed.
        self._live_reader: Callable[[], list[torch.Tensor]] | None = None
        self._baseline: dict[int, torch.Tensor] = {}  # tensors holding NaN/Inf at attach, for the guard
        self._loaded_epoch_open = False  # a state was loaded and the clock has not moved since: set_duration
        #: Counts changes of the average, so that ``ema_model`` refreshes its cast copies only when needed.
        self._version = 0

    def __repr__(self) -> str:
        return describe(
            self.half_lives, self.half_life, self.profiles, self.smoothing, self.update_interval, self.ema_start
        )

    @property
    def eval_average(self) -> int:
        """Which tracked average is evaluated, published and exported (an index, default 0)."""
        return self._eval_average

    @eval_average.setter
    def eval_average(self, index: int) -> None:
        check_eval_average(index, self.num_averages)
        if self._swap.swapped is not None:
            raise RuntimeError("eval_average cannot change while the EMA weights are swapped into a model")
        if index != self._eval_average:
            self._swap.forget_ema_model()  # built over the other average's storage
            self._eval_average = index

    # ------------------------------------------------------------------ state of the average
    @property
    def started(self) -> bool:
        """Whether the average exists (it starts as a copy of the weights at ``ema_start``)."""
        return self._storage is not None and self.start_count is not None

    @property
    def ema_weights_active(self) -> bool:
        """Whether the EMA weights are currently in a model (between get_ema_model and get_training_model)."""
        return self._swap.swapped is not None

    @property
    def model(self) -> nn.Module:
        """The model this EMA follows (as given to :meth:`attach`, wrappers included)."""
        if self._tracked.model is None:
            raise RuntimeError("this EMA follows no model yet: call ema.attach(model) first")
        return self._tracked.model

    @property
    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by canonical name (live views of the EMA storage, fp32 for low-precision models)."""
        self.require_started()
        assert self._storage is not None
        self.wait()
        return self._storage.state_dict()

    def require_started(self) -> None:
        """Raise RuntimeError, saying when the average will start, unless it has started."""
        if not self.started:
            raise RuntimeError(not_started_message(self.update_interval, self.ema_start))

    _require_started = require_started

    def attach(
        self,
        model: nn.Module,
        *,
        max_duration: str | Time | None = None,
        batches_per_epoch: int | None = None,
    ) -> None:
        """Follow ``model``: its trainable parameters and all its buffers, paired by canonical name.

        ``max_duration`` (``'Nba'``, ``'Nep'`` or ``'Nsp'``) is the length of training, needed only for
        ``'dur'`` times such as ``ema_start='0.5dur'``; ``batches_per_epoch`` lets an epoch ``max_duration``
        count the current epoch fractionally. Either can be given later with :meth:`set_duration`.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if self._tracked.model is not None and not self._tracked.is_own(model):
            raise RuntimeError("this EMA already follows another model; use one EMA per model")
        if max_duration is not None or batches_per_epoch is not None:
            self.set_duration(max_duration, batches_per_epoch)
        if self.snapshot_folder is not None:
            refuse_snapshots(model)  # ZeRO-3 (parallel/zero.py): no snapshots of partitions yet
        self.wait()  # flattening re-points the tensors a pending update reads
        self._tracked.attach(model, flatten=self.flatten_model)
        self._live_reader = self._tracked.live
        # the model's own NaN/Inf values (a -inf causal mask) as attached: not divergence, for the guard
        self._baseline = nonfinite_baseline(self._tracked.live())
        self._averages.prepared = None  # it holds views of the previous model's weights
        self._kept.attach(self.overlap)  # a choice naming nothing fails here; the set is fixed at the start
        check_at_attach(self.snapshot_folder, self._tracked.live(), self.fp32_ema, self.smoothings, stacklevel=3)

    def set_duration(self, max_duration: str | Time | None, batches_per_epoch: int | None = None) -> None:
        """Tell the EMA how long training is (for ``'dur'`` times), e.g. once a framework knows ``max_steps``.

        After :meth:`load_state_dict`, a ``batches_per_epoch`` equal to the state's ``batch_in_epoch`` means the
        checkpoint was written after an epoch's last batch, before its end: that :meth:`epoch_end` is run here."""
        if max_duration is not None:
            self.max_duration = check_duration(max_duration, self.ema_start)
        if batches_per_epoch is not None:
            self.batches_per_epoch = check_batches_per_epoch(batches_per_epoch)
            if self._loaded_epoch_open and 0 < self.batches_per_epoch == self.timestamp.batch_in_epoch:
                self.epoch_end()

    def wait(self) -> None:
        """Finish the pending overlapped update (``overlap=True``; on CUDA the current stream waits for the side
        stream, on CPU this joins the worker thread and re-raises its error); a no-op otherwise."""
        self._averages.wait()

    # ------------------------------------------------------------------ the clock
    def step(self, num_samples: int = 0) -> bool:
        """Count one optimizer step (of ``num_samples`` samples, for ``'sp'`` times); call it after each one.

        With ``'ba'`` units the average starts (as a copy of the weights) once ``ema_start`` is reached and
        then blends every ``update_interval``. Returns whether the average was started or blended.
        """
        self._swap.refuse_step()
        self.timestamp.advance_batch(num_samples)
        return self.tick(TimeUnit.BATCH)

    def epoch_end(self) -> bool:
        """Count one finished epoch; with ``'ep'`` units this is when the average starts or blends."""
        self.timestamp.advance_epoch()
        return self.tick(TimeUnit.EPOCH)

    def tick(self, unit: TimeUnit) -> bool:
        """Start or blend the average if it is due at the clock's current time in ``unit``.

        :meth:`step` and :meth:`epoch_end` call this after advancing the clock; a trainer that keeps the
        clock itself (sets :attr:`timestamp`) calls it directly. Returns whether the average changed.
        """
        self._loaded_epoch_open = False  # the clock moved on: a resume's epoch boundary is settled
        if unit != self.update_interval.unit:
            return False
        if self._tracked.model is None:
            raise RuntimeError("call ema.attach(model) before the first ema.step()")
        if self.snapshot_folder is not None:
            self._snapshots.check_once(self.snapshot_folder, self._tracked.device)
        count = self.timestamp.get(unit)
        if not self.started:
            due = start_due(self.ema_start, self.timestamp, self.max_duration, self.batches_per_epoch)
            if not (due and self._kept.start(self.overlap) and self._finite_or_skip(count)):
                return False
            self._initialise(count)
        elif update_due(count, self.update_interval) and self._finite_or_skip(count):
            self.update()
        else:
            return False
        if update_due(count, self.snapshot_interval):
            self.write_snapshot()
        return True

    # ------------------------------------------------------------------ starting and updating the average
    def _finite_or_skip(self, count: int) -> bool:
        """With ``skip_nonfinite``, False (and a warning) when the training weights hold NaN or Inf."""
        if not self.skip_nonfinite:
            return True
        flat = self._storage if self._swap.swapped is None and not self._tracked.sharded else None
        reference = self._storage.views() if self.started and self._storage is not None else self._baseline
        if training_weights_finite(self._swap.training_tensors, flat, self._tracked.sharded, reference):
            return True
        self.num_skipped_nonfinite += 1
        warnings.warn(skipped_message(self.update_interval.unit, count, self.num_skipped_nonfinite), stacklevel=3)
        return False

    def _initialise(self, count: int) -> None:
        """Start (or restart) every average as a copy of the training weights, at ``count``."""
        self.wait()
        sources = dict(zip(self._tracked.names, self._swap.training_tensors(), strict=True))
        if self._averages.start(sources, self.fp32_ema):
            self._swap.forget_ema_model()
        self.start_count = count
        self.num_updates = 0
        self._version += 1

    def update(self) -> None:
        """Blend the training weights into the average once, now (:meth:`step` calls this when it is due)."""
        self.require_started()
        self.wait()
        source: Callable[[], list[torch.Tensor]] | list[torch.Tensor] | None = self._live_reader
        if source is None or self._tracked.sharded or self._swap.swapped is not None:
            source = self._swap.training_tensors()  # a reusable plan only for plain models
        self._averages.blend(source, update_weights(self.smoothings, self.profiles, self.num_updates + 2, self.warmup))
        self._kept.after_blend(self._swap.training_tensors)
        self.num_updates += 1
        self._version += 1

    def write_snapshot(self) -> Path:
        """Write every tracked average to ``snapshot_folder`` now, as the next snapshot of the series.

        :meth:`step` calls this every ``snapshot_interval``. Under FSDP every rank must call it (each writes
        its shards); otherwise rank 0 writes one safetensors file.
        """
        self.require_started()
        if self.snapshot_folder is None:
            raise RuntimeError("this EMA has no snapshot_folder: pass snapshot_folder and snapshot_interval")
        self._snapshots.check_once(self.snapshot_folder, self._tracked.device)
        self.wait()
        return self._snapshots.write(
            self.snapshot_folder,
            self._averages_as_model_tensors(),
            self.profiles,
            t=self.num_updates + 1,
            step=self.timestamp.batch,
            update_interval=self.update_interval,
            dtype=self.snapshot_dtype,
        )

    # ------------------------------------------------------------------ swapping weights
    def get_ema_model(self, model: nn.Module) -> nn.Module:
        """Put the EMA weights into ``model`` (matched by canonical name, cast to its dtypes) and return it.

        The training weights are kept aside until :meth:`get_training_model`. A no-op if ``model`` already
        holds the EMA weights. Prefer :meth:`average_parameters`, which always swaps back.
        """
        self.require_started()
        assert self._storage is not None
        self.wait()
        return self._swap.put_in(model, self._storage)

    def get_training_model(self, model: nn.Module) -> nn.Module:
        """Put the training weights back into ``model`` and return it; a no-op if they are already there."""
        if not self._swap.is_swapped_out(model):
            return model
        self.wait()
        return self._swap.take_out(model)

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Within the block, ``model`` (default: the attached one) holds the EMA weights; yields it.

        Before the average has started the model keeps its training weights (there is no average yet to
        evaluate). On leaving the block, also through an exception, the training weights are put back
        exactly as they were. Nested use on the same model is a no-op inside. No optimizer step belongs inside:
        :meth:`step` raises there, and parameters changed in place there raise once the training weights are back.
        """
        target = self.model if model is None else model
        if not self.started or self._swap.swapped is not None:
            yield target
            return
        self.get_ema_model(target)
        assert self._storage is not None
        with self._swap.block(target, self._storage, self.wait):  # swaps back, then names what changed inside
            yield target

    @property
    def ema_model(self) -> nn.Module:
        """A module of the model's structure holding the average: eval mode, no gradients. Live storage:
        when the model's dtypes are the average's, its tensors are the EMA storage itself (no copy; it follows
        the average), so writing to them writes the average: a train-mode forward (``ema_model.train()``)
        moves the EMA's BatchNorm statistics. For an fp16/bf16 model with ``fp32_ema`` it is in the model's
        dtype, refreshed from the fp32 average each time this property is read. Frozen parameters are shared.
        """
        self.require_started()
        assert self._storage is not None
        self.wait()
        return self._swap.ema_model(self._storage, self._version)

    # ------------------------------------------------------------------ model states for checkpoints
    def published_model_state(self, model_state: Mapping[str, Any]) -> dict[str, Any]:
        """``model_state`` (canonical names) with the average, in each tensor's dtype, for the tracked tensors.

        What checkpoints publish and exports write as "the EMA model"; sharded tensors stay sharded. The
        training weights are used for tensors the average does not track (frozen parameters).
        """
        self.require_started()
        assert self._storage is not None
        self.wait()
        training = self.training_model_state(model_state)
        return states.published_model_state(self._tracked, model_state, training, self._storage)

    def training_model_state(self, model_state: Mapping[str, Any]) -> dict[str, Any]:
        """``model_state`` with the training weights for the tracked tensors, even while the EMA's are swapped in."""
        self.wait()
        return states.training_model_state(self._tracked, model_state, self._swap.training_backup())

    # ------------------------------------------------------------------ state for resuming
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs: the average (fp32 master), counters and the clock.

        As with torch's, the tensors are references to the live average: a state kept in memory (not saved)
        must be ``copy.deepcopy``-ed, or its tensors follow later updates while its counters do not."""
        self.wait()
        return states.ema_state(
            started=self.started,
            start_count=self.start_count,
            num_updates=self.num_updates,
            smoothing=self.smoothing,
            num_skipped_nonfinite=self.num_skipped_nonfinite,
            timestamp=self.timestamp,
            averages=self._averages_as_model_tensors() if self.started else [],
            snapshot_index=self._snapshots.index,
            snapshot_run=self._snapshots.run,
            profiles=self.profiles,
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`attach`); everything is checked before anything changes."""
        if not isinstance(state, Mapping):
            raise TypeError(f"EMA state must be a dict, got {type(state).__name__}")
        self.wait()
        with self._kept.saved_set(state, self.overlap):  # the set fixed at the state's start
            restored = states.read_state(state, self._tracked, self.num_averages, self.smoothing, 3, self.profiles)
        if self.snapshot_folder is not None:  # refuses a folder holding another run's snapshots
            self._snapshots.check_folder(self.snapshot_folder, restored.snapshot_run, self._tracked.device())
        if self._averages.restore(restored.averages, restored.live, self.fp32_ema):
            self._swap.forget_ema_model()
        self.start_count = restored.start_count
        self.num_updates = restored.num_updates
        self.num_skipped_nonfinite = restored.num_skipped_nonfinite
        if restored.timestamp is not None:
            self.timestamp = restored.timestamp
        self._snapshots.index = restored.snapshot_index
        self._snapshots.run = restored.snapshot_run
        self._loaded_epoch_open = True  # see set_duration
        if self.snapshot_folder is not None:
            # snapshots written after the resumed point are moved aside: their updates are redone
            self._snapshots.resume(self.snapshot_folder, self.num_updates + 1 if self.started else 0, stacklevel=3)
        self._version += 1

    def _averages_as_model_tensors(self) -> list[dict[str, torch.Tensor]]:
        """Every tracked average by name, as the model's tensors (DTensors for a sharded model)."""
        assert self._averages.storages is not None
        return [self._tracked.as_model_tensors(s.state_dict()) for s in self._averages.storages]
