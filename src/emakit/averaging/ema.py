"""The EMA of a model's weights, driven by any training loop.

This is the whole averaging: hyperparameters, when to start and blend (its own clock), where the weights
are (one flag), swapping the average in and out, and its state for an exact resume. It knows nothing of
any trainer: emakit's Trainer, the Lightning and Transformers callbacks each map their framework's events
onto its verbs (:meth:`EMA.attach`, :meth:`EMA.step`, :meth:`EMA.epoch_end`, :meth:`EMA.average_parameters`,
:meth:`EMA.state_dict` / :meth:`EMA.load_state_dict`) and add nothing else.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emakit.flatten import flatten_model_
from emakit.functional import (
    UpdatePlan,
    canonical_name,
    is_averaged,
    named_tensors,
    registration_count,
    tensor_slots,
    unwrap_model,
    validate_smoothing,
)
from emakit.overlap import Overlap, make_overlap
from emakit.parallel.ranks import all_reduce_sum, barrier, get_rank
from emakit.parallel.sharding import is_sharded_model, local_tensor, reshard_model, sharded_like
from emakit.posthoc.kernels import PreparedBlend, blend_averages_
from emakit.posthoc.profiles import HalfLifeProfile, PowerProfile, Profile, power_beta
from emakit.posthoc.snapshots import SNAPSHOT_DTYPES, discard_snapshots_after, next_snapshot_index, write_snapshot
from emakit.storage import FlatStorage, check_state_matches
from emakit.time import Time, Timestamp, TimeUnit, reached

__all__ = ["EMA"]


def _written_in_forward(model: nn.Module) -> set[str]:
    """Canonical names of parameters that their module's forward writes in place: an overlapped update
    blends them at once, like buffers. (``Embedding``/``EmbeddingBag`` with ``max_norm`` renormalise the
    rows they look up.)"""
    written = set()
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None:
            written.add(canonical_name(f"{module_name}.weight" if module_name else "weight"))
    return written


class _DefaultHalfLife(str):
    """Marks the default ``half_life`` so that ``EMA(smoothing=0.99)`` works without ``half_life=None``."""


_DEFAULT_HALF_LIFE = _DefaultHalfLife("1000ba")
_UPDATE_UNITS = (TimeUnit.BATCH, TimeUnit.EPOCH)
_DURATION_UNITS = (TimeUnit.BATCH, TimeUnit.EPOCH, TimeUnit.SAMPLE)
#: Update phases with ``overlap=True``: buffers (and copied tensors) at once, floating parameters alongside the
#: next step. BatchNorm's forward and DDP's broadcast write buffers; only the optimizer step writes parameters.
_NOW, _ALONGSIDE = 0, 1


class EMA:
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
    """

    def __init__(
        self,
        half_life: str | Time | None = _DEFAULT_HALF_LIFE,
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
    ) -> None:
        explicit_half_life = half_life is not None and not isinstance(half_life, _DefaultHalfLife)
        given = [
            name
            for name, value in (("half_life", explicit_half_life), ("smoothing", smoothing), ("sigma_rel", sigma_rel))
            if value is not None and value is not False
        ]
        if len(given) > 1:
            shown = ", ".join(
                f"{n}={v!r}"
                for n, v in (("half_life", half_life), ("smoothing", smoothing), ("sigma_rel", sigma_rel))
                if n in given
            )
            raise ValueError(f"give exactly one of half_life, smoothing and sigma_rel, got {shown}")
        if smoothing is None and half_life is None and sigma_rel is None:
            raise ValueError("give exactly one of half_life, smoothing and sigma_rel, got none")
        half_lives: list[Any] = [half_life]
        if isinstance(half_life, (list, tuple)):
            if not half_life:
                raise ValueError("half_life must be a time or a non-empty list of times, got []")
            half_lives = list(half_life)
        if sigma_rel is not None:
            half_life = None
        for name, flag in (
            ("fp32_ema", fp32_ema),
            ("skip_nonfinite", skip_nonfinite),
            ("flatten_model", flatten_model),
            ("overlap", overlap),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")

        self.half_life: Time | None = None
        self.half_lives: list[Time] = []
        if smoothing is None and half_life is not None:
            for value in half_lives:
                parsed = Time.coerce(value, "half_life", _UPDATE_UNITS, positive=True)
                if parsed.value <= 0:
                    raise ValueError(f"half_life must be greater than 0, got {str(parsed)!r}")
                if self.half_lives and parsed.unit != self.half_lives[0].unit:
                    raise ValueError(
                        f"half_life: every half-life needs the same unit, got {str(self.half_lives[0])!r} and {str(parsed)!r}"
                    )
                self.half_lives.append(parsed)
            self.half_life = self.half_lives[0]
        default_interval = Time(1, self.half_life.unit) if self.half_life is not None else Time(1, TimeUnit.BATCH)
        self.update_interval: Time = (
            default_interval
            if update_interval is None
            else Time.coerce(update_interval, "update_interval", _UPDATE_UNITS, positive=True)
        )
        if self.update_interval.value <= 0:
            raise ValueError(f"update_interval must be greater than 0, got {str(self.update_interval)!r}")
        if self.half_life is not None and self.update_interval.unit != self.half_life.unit:
            raise ValueError(
                f"update_interval must be in half_life's unit {self.half_life.unit.value!r}, "
                f"got update_interval={str(self.update_interval)!r} and half_life={str(self.half_life)!r}"
            )
        #: One profile per tracked average; ``smoothings[j]`` is its constant coefficient (None for power profiles).
        self.profiles: list[Profile] = []
        self.smoothings: list[float | None] = []
        if smoothing is not None:
            coefficient = validate_smoothing(smoothing)
            self.smoothings = [coefficient]
            self.profiles = [HalfLifeProfile(-1.0 / math.log2(coefficient))] if 0 < coefficient < 1 else []
        elif sigma_rel is not None:
            values: list[float] = list(sigma_rel) if isinstance(sigma_rel, (list, tuple)) else [sigma_rel]  # type: ignore[list-item]
            if not values:
                raise ValueError("sigma_rel must be a number or a non-empty list of numbers, got []")
            self.profiles = [PowerProfile.from_sigma_rel(v) for v in values]
            self.smoothings = [None] * len(values)
        else:
            for h in self.half_lives:
                self.smoothings.append(2.0 ** (-self.update_interval.value / h.value))
                self.profiles.append(HalfLifeProfile(h.value / self.update_interval.value))
                if self.update_interval.value > h.value:
                    warnings.warn(
                        f"update_interval='{self.update_interval}' is longer than half_life='{h}': each "
                        f"update keeps only {self.smoothings[-1]:.3g} of the average, so it barely smooths; use an "
                        "update_interval well below the half-life",
                        stacklevel=2,
                    )
        #: The first average's constant coefficient (NaN for a power profile, whose coefficient changes).
        self.smoothing: float = self.smoothings[0] if self.smoothings[0] is not None else math.nan
        self.num_averages = len(self.smoothings)
        if (
            isinstance(eval_average, bool)
            or not isinstance(eval_average, int)
            or not 0 <= eval_average < self.num_averages
        ):
            raise ValueError(
                f"eval_average must be an index into the {self.num_averages} tracked average(s), got {eval_average!r}"
            )
        self._eval_average = eval_average
        if overlap and self.num_averages > 1:
            raise ValueError(
                f"overlap=True works with one average, got {self.num_averages} (half_life or sigma_rel list)"
            )
        self.snapshot_interval: Time | None = None
        self.snapshot_folder = Path(snapshot_folder) if snapshot_folder is not None else None
        if (snapshot_interval is None) != (snapshot_folder is None):
            raise ValueError(
                "give snapshot_interval and snapshot_folder together, got "
                f"snapshot_interval={snapshot_interval!r} and snapshot_folder={snapshot_folder!r}"
            )
        if snapshot_interval is not None:
            self.snapshot_interval = Time.coerce(snapshot_interval, "snapshot_interval", (self.update_interval.unit,))
            value = self.snapshot_interval.value
            if value <= 0 or value % self.update_interval.value:
                raise ValueError(
                    f"snapshot_interval must be a positive multiple of update_interval='{self.update_interval}', "
                    f"got {str(self.snapshot_interval)!r}"
                )
        if snapshot_dtype not in SNAPSHOT_DTYPES:
            raise ValueError(
                f"snapshot_dtype must be one of {', '.join(map(str, SNAPSHOT_DTYPES))}, got {snapshot_dtype!r}"
            )
        self.snapshot_dtype = snapshot_dtype
        self._snapshot_index = 0
        self.ema_start: Time = Time.coerce(ema_start, "ema_start")
        if self.ema_start.unit == TimeUnit.DURATION and self.ema_start.value > 1:
            raise ValueError(f"ema_start in 'dur' must be in [0, 1], got {str(self.ema_start)!r}")
        if self.ema_start.value < 0:
            raise ValueError(f"ema_start must be 0 or more, got {str(self.ema_start)!r}")
        self.fp32_ema = fp32_ema
        self.skip_nonfinite = skip_nonfinite
        self.num_skipped_nonfinite = 0
        self.flatten_model = flatten_model
        self.overlap = overlap
        self._overlap: Overlap | None = None
        self._overlap_device: torch.device | None = None
        #: Per tracked tensor, when it is blended with ``overlap`` (_NOW or _ALONGSIDE); a tuple kept as one
        #: object, so that the storage keeps its update plan between updates.
        self._phases: tuple[int, ...] | None = None
        #: Reads the training tensors; FlatStorage keeps its update plan while this same reader is passed.
        self._live_reader: Callable[[], list[torch.Tensor]] | None = None
        #: Several averages: the first storage's update plan and the blend prepared for it, rebuilt when the
        #: plan is; dropped whenever the model or the storages change.
        self._prepared: tuple[UpdatePlan, PreparedBlend] | None = None

        #: The EMA's clock: optimizer steps (``batch``), samples and epochs counted by :meth:`step` and
        #: :meth:`epoch_end` (or set by the Trainer). Saved in :meth:`state_dict`.
        self.timestamp = Timestamp()
        self.max_duration: Time | None = None
        self.batches_per_epoch: int | None = None
        self.num_updates = 0
        self.start_count: int | None = None
        self._model: nn.Module | None = None
        self._names: list[str] = []
        self._slots: list[tuple[dict, str]] = []
        self._slots_count = -1
        #: FSDP2-sharded model (DTensor parameters): the storage holds this rank's shards only.
        self._sharded = False
        #: One storage per tracked average (None before the start); ``_storage`` is the evaluated one.
        self._storages: list[FlatStorage] | None = None
        self._backup: FlatStorage | None = None
        self._swapped: nn.Module | None = None
        self._ema_model: nn.Module | None = None
        #: For a model whose dtype differs from the average's: (model-dtype tensor of ema_model, average view).
        self._ema_model_casts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._version = 0
        self._ema_model_version = -1

    def __repr__(self) -> str:
        if len(self.half_lives) > 1:
            timing = f"half_life={[str(h) for h in self.half_lives]}"
        elif self.half_life is not None:
            timing = f"half_life='{self.half_life}'"
        elif isinstance(self.profiles[0] if self.profiles else None, PowerProfile):
            timing = f"sigma_rel={[round(p.sigma_rel, 6) for p in self.profiles if isinstance(p, PowerProfile)]}"
        else:
            timing = f"smoothing={self.smoothing}"
        shown = f", smoothing={self.smoothing:.6g}" if not math.isnan(self.smoothing) else ""
        return f"EMA({timing}, update_interval='{self.update_interval}', ema_start='{self.ema_start}'{shown})"

    @property
    def eval_average(self) -> int:
        """Which tracked average is evaluated, published and exported (an index, default 0)."""
        return self._eval_average

    @eval_average.setter
    def eval_average(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_averages:
            raise ValueError(
                f"eval_average must be an index into the {self.num_averages} tracked average(s), got {index!r}"
            )
        if self._swapped is not None:
            raise RuntimeError("eval_average cannot change while the EMA weights are swapped into a model")
        if index != self._eval_average:
            self._ema_model = None  # built over the other average's storage
            self._eval_average = index

    @property
    def _storage(self) -> FlatStorage | None:
        return None if self._storages is None else self._storages[self.eval_average]

    # ------------------------------------------------------------------ state of the average
    @property
    def started(self) -> bool:
        """Whether the average exists (it starts as a copy of the weights at ``ema_start``)."""
        return self._storage is not None and self.start_count is not None

    @property
    def ema_weights_active(self) -> bool:
        """Whether the EMA weights are currently in a model (between get_ema_model and get_training_model)."""
        return self._swapped is not None

    @property
    def model(self) -> nn.Module:
        """The model this EMA follows (as given to :meth:`attach`, wrappers included)."""
        if self._model is None:
            raise RuntimeError("this EMA follows no model yet: call ema.attach(model) first")
        return self._model

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
            unit = "batch end (optimizer step)" if self.update_interval.unit == TimeUnit.BATCH else "epoch end"
            raise RuntimeError(
                f"the EMA has not started yet: it starts as a copy of the weights at the first {unit} where "
                f"training progress reaches ema_start='{self.ema_start}'"
            )

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
        if self._model is not None and unwrap_model(self._model) is not unwrap_model(model):
            raise RuntimeError("this EMA already follows another model; use one EMA per model")
        if max_duration is not None or batches_per_epoch is not None:
            self.set_duration(max_duration, batches_per_epoch)
        self.wait()  # flattening re-points the tensors a pending update reads
        self._model = model
        params = named_tensors(model, include_buffers=False)
        self._names = [n for n in named_tensors(model) if n not in params or params[n].requires_grad]
        self._slots = tensor_slots(model, self._names)
        self._slots_count = registration_count()
        self._sharded = is_sharded_model(model)
        if self.flatten_model and not self._sharded:
            flatten_model_(model)
        self._live_reader = self._live
        self._prepared = None  # it holds views of the previous model's weights
        if self.overlap:
            self._setup_overlap(model, params)

    def set_duration(self, max_duration: str | Time | None, batches_per_epoch: int | None = None) -> None:
        """Tell the EMA how long training is (for ``'dur'`` times), e.g. once a framework knows ``max_steps``."""
        if max_duration is not None:
            duration = Time.coerce(max_duration, "max_duration", _DURATION_UNITS, positive=True)
            if duration.value <= 0:
                raise ValueError(f"max_duration must be greater than 0, got {str(duration)!r}")
            if self.ema_start.unit == duration.unit and self.ema_start > duration:
                raise ValueError(
                    f"ema_start='{self.ema_start}' is after max_duration='{duration}': the EMA would never start"
                )
            self.max_duration = duration
        if batches_per_epoch is not None:
            if isinstance(batches_per_epoch, bool) or not isinstance(batches_per_epoch, int) or batches_per_epoch < 0:
                raise ValueError(f"batches_per_epoch must be a non-negative int or None, got {batches_per_epoch!r}")
            self.batches_per_epoch = batches_per_epoch

    def _setup_overlap(self, model: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
        tensors = self._live()
        written = _written_in_forward(model)
        self._phases = tuple(
            _ALONGSIDE if name in params and name not in written and is_averaged(t) else _NOW
            for name, t in zip(self._names, tensors, strict=True)
        )
        devices = sorted({str(t.device) for t, p in zip(tensors, self._phases, strict=True) if p == _ALONGSIDE})
        if len(devices) > 1:
            raise ValueError(
                f"overlap=True needs the model's trainable parameters on one device, found {', '.join(devices)}"
            )
        device = torch.device(devices[0]) if devices else None
        if device != self._overlap_device:
            self._overlap = make_overlap(device) if device is not None else None
            self._overlap_device = device

    def wait(self) -> None:
        """Finish the pending overlapped update (``overlap=True``); a no-op otherwise.

        On CUDA the current stream waits for the side stream (the host does not block); on CPU this joins the
        worker thread and re-raises its error, if any.
        """
        if self._overlap is not None:
            self._overlap.wait()

    # ------------------------------------------------------------------ the clock
    def step(self, num_samples: int = 0) -> bool:
        """Count one optimizer step (of ``num_samples`` samples, for ``'sp'`` times); call it after each one.

        With ``'ba'`` units the average starts (as a copy of the weights) once ``ema_start`` is reached and
        then blends every ``update_interval``. Returns whether the average was started or blended.
        """
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
        if unit != self.update_interval.unit:
            return False
        if self._model is None:
            raise RuntimeError("call ema.attach(model) before the first ema.step()")
        count = self.timestamp.get(unit)
        if not self.started:
            if not (self._start_due() and self._finite_or_skip(count)):
                return False
            self._initialise(count)
        elif count % int(self.update_interval.value) == 0 and self._finite_or_skip(count):
            self.update()
        else:
            return False
        if self._snapshot_due(count):
            self.write_snapshot()
        return True

    def _start_due(self) -> bool:
        if self.ema_start.unit == TimeUnit.DURATION and self.max_duration is None:
            if self.ema_start.value == 0:
                return True
            raise ValueError(
                f"ema_start='{self.ema_start}' is a fraction of the training length, which this EMA was not told: "
                "pass max_duration to ema.attach(model, max_duration=...) or ema.set_duration(...)"
            )
        return reached(self.timestamp, self.ema_start, self.max_duration, self.batches_per_epoch)

    # ------------------------------------------------------------------ reading and writing weights
    def _model_tensors(self, model: nn.Module | None = None) -> list[torch.Tensor]:
        """The tracked tensors as the model holds them: DTensors for sharded parameters (after resharding)."""
        model = self._model if model is None else model
        assert model is not None
        reshard_model(model)
        slots = self._slots if model is self._model else tensor_slots(model, self._names)
        return [table[key] for table, key in slots]

    def _as_model_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` (this rank's shards) as DTensors sharded like the model's, for sharded checkpoints."""
        if not self._sharded:
            return dict(tensors)
        like = dict(zip(self._names, self._model_tensors(), strict=True))
        return {name: sharded_like(t, like[name]) if name in like else t for name, t in tensors.items()}

    def _live(self, model: nn.Module | None = None) -> list[torch.Tensor]:
        if self._sharded:  # read and write this rank's shards, in place
            return [local_tensor(t) for t in self._model_tensors(model)]
        if model is None or model is self._model:
            count = registration_count()
            if count != self._slots_count:  # a submodule or tensor was registered anew: find the tables again
                assert self._model is not None
                self._slots = tensor_slots(self._model, self._names)
                self._slots_count = count
            return [table[key] for table, key in self._slots]
        return [table[key] for table, key in tensor_slots(model, self._names)]

    def _training_tensors(self) -> list[torch.Tensor]:
        """The training weights, wherever they are: in the model, or in the backup while swapped out."""
        if self._backup is not None and self._swapped is not None and self._is_own(self._swapped):
            return self._backup.views()
        return self._live()

    def _is_own(self, model: nn.Module) -> bool:
        return self._model is not None and unwrap_model(model) is unwrap_model(self._model)

    def _initialise(self, count: int) -> None:
        self.wait()
        sources = dict(zip(self._names, self._training_tensors(), strict=True))
        if self._storages is None:
            self._storages = [FlatStorage(sources, fp32_ema=self.fp32_ema) for _ in range(self.num_averages)]
            self._prepared = None
            self._ema_model = None
        else:
            for storage in self._storages:
                storage.copy_from(list(sources.values()))
        self.start_count = count
        self.num_updates = 0
        self._version += 1

    def update(self) -> None:
        """Blend the training weights into the average once, now (:meth:`step` calls this when it is due)."""
        self.require_started()
        assert self._storage is not None
        self.wait()
        source: Callable[[], list[torch.Tensor]] | list[torch.Tensor] | None = self._live_reader
        if source is None or self._sharded or self._swapped is not None:  # a reusable plan only for plain models
            source = self._training_tensors()
        weights = self._weights(self.num_updates + 2)  # the start, a copy of the weights, was update 1
        weight = weights[0]
        if self._storages is not None and len(self._storages) > 1:
            self._blend_all(source, weights)
        elif self._overlap is None:
            self._storage.blend(source, weight)
        else:
            plan = self._storage.prepare(source, self._phases)
            plan.run(weight, _NOW)
            self._overlap.launch(plan.bound(weight, _ALONGSIDE))
        self.num_updates += 1
        self._version += 1

    def _blend_all(self, source: Callable[[], list[torch.Tensor]] | list[torch.Tensor], weights: list[float]) -> None:
        """Every average from one read of the training weights.

        The storages share one layout, so the first storage's update plan also pairs the others. While that
        plan stays current, the blend runs over lists prepared once for it (:class:`PreparedBlend`): over
        the plan's few flat spans for a flattened model, over every tensor otherwise.
        """
        assert self._storages is not None
        if callable(source):
            plan = self._storages[0].prepare(source)
            if plan.reusable or plan.sources is not None:
                if self._prepared is None or self._prepared[0] is not plan:
                    self._prepared = None  # its views of the weights must be gone before the count
                    self._prepared = (plan, self._prepared_blend(plan))
                    plan.snapshot()  # the prepared chunks are views of the weights' buffers: count them as current
                self._prepared[1](weights)
                return
            source = source()
        blend_averages_([storage.views() for storage in self._storages], source, weights)

    def _prepared_blend(self, plan: UpdatePlan) -> PreparedBlend:
        """The blend of every storage with ``plan``'s sources (``plan`` pairs the first storage)."""
        assert self._storages is not None
        offsets = [t.storage_offset() for t in self._storages[0].views()]
        for storage in self._storages[1:]:
            if [t.storage_offset() for t in storage.views()] != offsets:
                raise RuntimeError("the tracked averages' storages are not laid out alike")  # never expected
        if plan.sources is not None:
            return PreparedBlend([storage.views() for storage in self._storages], plan.sources)
        averages = [
            [
                storage.buffers[(g.target.device, g.target.dtype)].as_strided(
                    g.target.shape, (1,), g.target.storage_offset()
                )
                for g in plan.flat
            ]
            for storage in self._storages
        ]
        return PreparedBlend(averages, [g.source for g in plan.flat])

    def _weights(self, t: int) -> list[float]:
        """``1 - beta`` of every average for update number ``t`` (1-based, counting the start)."""
        weights = []
        for j, smoothing in enumerate(self.smoothings):
            if smoothing is None:
                profile = self.profiles[j]
                assert isinstance(profile, PowerProfile)
                weights.append(1.0 - power_beta(t, profile.gamma))
            else:
                weights.append(1.0 - smoothing)
        return weights

    def _snapshot_due(self, count: int) -> bool:
        return self.snapshot_interval is not None and count % int(self.snapshot_interval.value) == 0

    def write_snapshot(self) -> Path:
        """Write every tracked average to ``snapshot_folder`` now, as the next snapshot of the series.

        :meth:`step` calls this every ``snapshot_interval``. Under FSDP every rank must call it (each writes
        its shards); otherwise rank 0 writes one safetensors file.
        """
        self.require_started()
        if self.snapshot_folder is None:
            raise RuntimeError("this EMA has no snapshot_folder: pass snapshot_folder and snapshot_interval")
        assert self._storages is not None
        self.wait()
        averages = [self._as_model_tensors(storage.state_dict()) for storage in self._storages]
        interval = int(self.update_interval.value)
        path = write_snapshot(
            self.snapshot_folder,
            self._snapshot_index,
            averages,
            self.profiles if len(self.profiles) == self.num_averages else [HalfLifeProfile(1e-9)] * self.num_averages,
            t=self.num_updates + 1,
            step=self.timestamp.batch,
            update_interval=interval if self.update_interval.unit == TimeUnit.BATCH else 1,
            dtype=self.snapshot_dtype,
        )
        self._snapshot_index += 1
        return path

    def _finite_or_skip(self, count: int) -> bool:
        """With ``skip_nonfinite``, False (and a warning) when the training weights hold NaN or Inf."""
        if not self.skip_nonfinite:
            return True
        finite = self._training_weights_finite()
        if self._sharded:  # each rank sees its shards only; all must skip together or the shards drift apart
            device = next((t.device for t in self._training_tensors()), torch.device("cpu"))
            finite = all_reduce_sum([0.0 if finite else 1.0], device)[0] == 0.0
        if finite:
            return True
        self.num_skipped_nonfinite += 1
        unit = "batch" if self.update_interval.unit == TimeUnit.BATCH else "epoch"
        warnings.warn(
            f"EMA update at {unit} {count} skipped: the training weights contain NaN or Inf "
            f"({self.num_skipped_nonfinite} skipped so far)",
            stacklevel=3,
        )
        return False

    def _training_weights_finite(self) -> bool:
        """Whether every floating training weight is finite (NaN and Inf propagate through min and max)."""
        spans = None
        if self._storage is not None and self._swapped is None and not self._sharded:
            spans = self._storage.current_flat_sources()  # flattened model: a few buffers, one pass each
        if spans is None:
            spans = [t for t in self._training_tensors() if t.is_floating_point() and t.numel() > 0]
            if not spans:
                return True
            # The max-abs norm is Inf/NaN exactly when a value is; unlike the 2-norm it cannot overflow.
            norms = torch._foreach_norm(spans, float("inf"))
            return bool(torch.stack([n.float() for n in norms]).isfinite().all())
        for span in spans:
            low, high = torch.aminmax(span)
            if not (bool(low.isfinite()) and bool(high.isfinite())):
                return False
        return True

    # ------------------------------------------------------------------ swapping weights
    def get_ema_model(self, model: nn.Module) -> nn.Module:
        """Put the EMA weights into ``model`` (matched by canonical name, cast to its dtypes) and return it.

        The training weights are kept aside until :meth:`get_training_model`. A no-op if ``model`` already
        holds the EMA weights. Prefer :meth:`average_parameters`, which always swaps back.
        """
        self.require_started()
        assert self._storage is not None
        self.wait()
        if self._swapped is not None:
            if unwrap_model(self._swapped) is unwrap_model(model):
                return model
            raise RuntimeError("the EMA weights are already in another model; call ema.get_training_model on it first")
        targets = self._live(model)
        self._backup = FlatStorage(dict(zip(self._names, targets, strict=True)), fp32_ema=False)
        self._storage.copy_to(targets)
        self._swapped = model
        return model

    def get_training_model(self, model: nn.Module) -> nn.Module:
        """Put the training weights back into ``model`` and return it; a no-op if they are already there."""
        if self._swapped is None or unwrap_model(self._swapped) is not unwrap_model(model):
            return model
        assert self._backup is not None
        self.wait()
        self._backup.copy_to(self._live(model))
        self._backup = None
        self._swapped = None
        return model

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Within the block, ``model`` (default: the attached one) holds the EMA weights; yields it.

        Before the average has started the model keeps its training weights (there is no average yet to
        evaluate). On leaving the block, also through an exception, the training weights are put back
        exactly as they were. Nested use on the same model is a no-op inside.
        """
        target = self.model if model is None else model
        if not self.started or self._swapped is not None:
            yield target
            return
        self.get_ema_model(target)
        try:
            yield target
        finally:
            self.get_training_model(target)

    @property
    def ema_model(self) -> nn.Module:
        """A module of the model's structure holding the average: eval mode, no gradients.

        Its tensors are the EMA storage itself (no copy; it follows the average as it updates) when the
        model's dtypes are the average's. For an fp16/bf16 model with ``fp32_ema`` it is in the model's
        dtype, so it runs on the same inputs as the model; its tensors are refreshed from the fp32 average
        each time this property is read. Frozen parameters are shared with the training model.
        """
        self.require_started()
        self.wait()
        if self._ema_model is None:
            self._ema_model = self._build_ema_model()
            self._ema_model_version = -1
        if self._ema_model_casts and self._ema_model_version != self._version:
            with torch.no_grad():
                for target, source in self._ema_model_casts:
                    target.copy_(source)
        self._ema_model_version = self._version
        return self._ema_model

    def _build_ema_model(self) -> nn.Module:
        assert self._model is not None and self._storage is not None
        if self._sharded:
            raise RuntimeError(
                "ema_model is not available for a sharded (FSDP) model: each rank holds only its shards of the "
                "average. Use emakit.export_ema_weights(ema, path) to write the whole EMA to one file, "
                "or `with ema.average_parameters():` to run the sharded model on the EMA weights"
            )
        module = unwrap_model(self._model)
        memo: dict[int, Any] = {}
        casts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for (table, key), name in zip(tensor_slots(module, self._names), self._names, strict=True):
            original = table[key]
            view = self._storage.tensors[name]
            if view.dtype != original.dtype:
                cast = view.detach().to(original.dtype)
                casts.append((cast, view))
                view = cast
            memo[id(original)] = nn.Parameter(view, requires_grad=False) if isinstance(original, nn.Parameter) else view
        for param in module.parameters():
            memo.setdefault(id(param), param)
        ema_model = copy.deepcopy(module, memo)
        self._ema_model_casts = casts
        return ema_model.eval()

    def published_model_state(self, model_state: Mapping[str, Any]) -> dict[str, Any]:
        """``model_state`` (canonical names) with the average, in each tensor's dtype, for the tracked tensors.

        What checkpoints publish and exports write as "the EMA model"; sharded tensors stay sharded. The
        training weights are used for tensors the average does not track (frozen parameters).
        """
        self.require_started()
        assert self._storage is not None
        self.wait()
        state = self.training_model_state(model_state)
        ema = self._as_model_tensors(
            {
                name: t if name not in state or t.dtype == state[name].dtype else t.to(state[name].dtype)
                for name, t in self._storage.tensors.items()
            }
        )
        for key, name in self._keys_of_tracked(model_state):
            state[key] = ema[name]
        return state

    def _keys_of_tracked(self, model_state: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(state key, tracked name) for every key holding a tracked tensor: its own name, and the other names of
        tied weights (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``), which must get the same value."""
        pairs = [(name, name) for name in self._names if name in model_state]
        if self._sharded:
            return pairs
        owner: dict[tuple[int, torch.Size, torch.dtype], str] = {}
        for name, tensor in zip(self._names, self._live(), strict=True):
            if tensor.numel():
                owner[(tensor.data_ptr(), tensor.shape, tensor.dtype)] = name
        tracked = set(self._names)
        for key, value in model_state.items():
            if key not in tracked and isinstance(value, torch.Tensor) and value.numel():
                found = owner.get((value.data_ptr(), value.shape, value.dtype))
                if found is not None:
                    pairs.append((key, found))
        return pairs

    def training_model_state(self, model_state: Mapping[str, Any]) -> dict[str, Any]:
        """``model_state`` with the training weights for the tracked tensors, even while the EMA's are swapped in."""
        self.wait()
        state = dict(model_state)
        if self._backup is not None and self._swapped is not None and self._is_own(self._swapped):
            backup = self._as_model_tensors(dict(zip(self._names, self._backup.views(), strict=True)))
            for key, name in self._keys_of_tracked(model_state):
                state[key] = backup[name]
        return state

    # ------------------------------------------------------------------ state for resuming
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs: the average (fp32 master), counters and the clock."""
        self.wait()
        return {
            "started": self.started,
            "start_count": self.start_count,
            "num_updates": self.num_updates,
            "smoothing": self.smoothing,
            "num_skipped_nonfinite": self.num_skipped_nonfinite,
            "timestamp": self.timestamp.state_dict(),
            "ema": self._as_model_tensors(self._storages[0].state_dict()) if self._storages and self.started else None,
            # the other tracked averages (half_life or sigma_rel lists), and where the snapshot series stands
            "more_averages": [self._as_model_tensors(s.state_dict()) for s in self._storages[1:]]
            if self._storages and self.started
            else [],
            "snapshot_index": self._snapshot_index,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`attach`); everything is checked before anything changes."""
        if not isinstance(state, Mapping):
            raise TypeError(f"EMA state must be a dict, got {type(state).__name__}")
        self.wait()
        for key in ("started", "start_count", "num_updates", "ema"):
            if key not in state:
                raise ValueError(f"EMA state has no {key!r} entry; keys: {sorted(state)}")
        timestamp = Timestamp()
        if state.get("timestamp") is not None:
            timestamp.load_state_dict(dict(state["timestamp"]))
        ema = state["ema"]
        if state["started"]:
            if self._model is None:
                raise RuntimeError("attach the EMA to its model (ema.attach(model)) before loading its state")
            if not isinstance(ema, Mapping):
                raise ValueError("EMA state is marked started but holds no 'ema' tensors")
            saved = [ema, *(state.get("more_averages") or [])]
            if len(saved) != self.num_averages:
                raise ValueError(
                    f"EMA state holds {len(saved)} average(s), this EMA tracks {self.num_averages}: "
                    "resume with the same half_life / sigma_rel list"
                )
            live = dict(zip(self._names, self._model_tensors() if self._sharded else self._live(), strict=True))
            for average in saved:
                check_state_matches(average, live, "EMA state")
            if self._sharded:  # keep this rank's shards
                saved = [{name: local_tensor(t) for name, t in average.items()} for average in saved]
                live = dict(zip(self._names, self._live(), strict=True))
            saved_smoothing = state.get("smoothing")
            if (
                isinstance(saved_smoothing, float)
                and not (math.isnan(saved_smoothing) and math.isnan(self.smoothing))
                and not math.isclose(saved_smoothing, self.smoothing)
            ):
                warnings.warn(
                    f"resuming an EMA saved with smoothing={saved_smoothing:.6g} with smoothing={self.smoothing:.6g}",
                    stacklevel=2,
                )
            if self._storages is None:
                self._storages = [FlatStorage(live, fp32_ema=self.fp32_ema) for _ in range(self.num_averages)]
                self._prepared = None
                self._ema_model = None
            for storage, average in zip(self._storages, saved, strict=True):
                storage.load_state_dict(average)
            self.start_count = int(state["start_count"])
        else:
            self._storages = None
            self._prepared = None
            self._ema_model = None
            self.start_count = None
        self.num_updates = int(state["num_updates"])
        self.num_skipped_nonfinite = int(state.get("num_skipped_nonfinite", 0))
        if state.get("timestamp") is not None:
            self.timestamp = timestamp
        self._snapshot_index = int(state.get("snapshot_index", 0))
        if self.snapshot_folder is not None:
            self._resume_snapshots()
        self._version += 1

    def _resume_snapshots(self) -> None:
        """Drop snapshots written after the resumed point (their updates are redone), so the series continues
        without a gap or a duplicate."""
        assert self.snapshot_folder is not None
        if get_rank() == 0:
            discard_snapshots_after(self.snapshot_folder, self.num_updates + 1 if self.started else 0)
        barrier()
        found = next_snapshot_index(self.snapshot_folder)
        if found != self._snapshot_index:
            warnings.warn(
                f"snapshot_folder {str(self.snapshot_folder)!r} holds {found} snapshot(s) up to the resumed point, "
                f"the EMA state says {self._snapshot_index}: continuing at {found}",
                stacklevel=3,
            )
            self._snapshot_index = found
