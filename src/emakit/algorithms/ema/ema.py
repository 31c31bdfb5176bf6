"""The EMA algorithm: an exponential moving average of the model's weights, run by the Trainer."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from emakit.core.algorithm import Algorithm
from emakit.core.event import Event
from emakit.distributed import all_reduce_sum, is_sharded_model, local_tensor, reshard_model, sharded_like
from emakit.flatten import flatten_model_
from emakit.functional import canonical_name, is_averaged, named_tensors, tensor_slots, unwrap_model, validate_smoothing
from emakit.overlap import Overlap, make_overlap
from emakit.storage import FlatStorage, check_state_matches
from emakit.time import Time, TimeUnit, reached

if TYPE_CHECKING:
    from emakit.core.logger import Logger
    from emakit.core.state import State

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
#: Update phases with ``overlap=True``: buffers (and copied tensors) at once, floating parameters alongside the
#: next step. BatchNorm's forward and DDP's broadcast write buffers; only the optimizer step writes parameters.
_NOW, _ALONGSIDE = 0, 1


class EMA(Algorithm):
    """Keep an exponential moving average of the model's trainable parameters and buffers.

    Every ``update_interval`` the average moves toward the training weights,
    ``ema = smoothing * ema + (1 - smoothing) * weights`` with ``smoothing = 2 ** (-update_interval / half_life)``,
    so a weight's contribution halves every ``half_life``. Integer buffers are copied, not averaged.

    Args:
        half_life: time for a contribution to halve, in ``'ba'`` or ``'ep'`` (default ``'1000ba'``).
            Give ``smoothing`` instead to set the coefficient directly.
        smoothing: the per-update coefficient in [0, 1]; excludes an explicit ``half_life``.
        ema_start: when the average starts, as a copy of the weights: ``'ba'``, ``'ep'``, ``'sp'`` or
            ``'dur'`` (a fraction of ``max_duration`` in [0, 1]). Default ``'0.0dur'``.
        update_interval: time between updates, in half_life's unit (default 1 of it, or ``'1ba'`` with
            ``smoothing``).
        fp32_ema: keep the average of fp16/bf16 tensors in fp32 (default). A 16-bit average stops moving
            once ``1 - smoothing`` is below the dtype's resolution; False keeps the model's dtype.
        skip_nonfinite: before each update, check the training weights for NaN/Inf and skip the update
            (with a warning, counted in ``num_skipped_nonfinite``) if any is found, so one bad step
            cannot poison the average. Off by default: the check reads the weights once more.
        flatten_model: at :meth:`attach`, re-point the model's parameters and buffers as views into one
            buffer per (device, dtype) (:func:`emakit.flatten.flatten_model_`; Parameter objects and so
            optimizers are unaffected), so that each update is one kernel per buffer instead of one per
            tensor. Off by default because it changes where the model's tensors live; worth it for models
            of many small tensors. ``model.to(...)`` or replacing a parameter afterwards undoes it, and the
            update falls back to the grouped path.
        overlap: run the parameters' part of each update alongside the next training step instead of in
            it: on a CUDA side stream for CUDA models, on a worker thread for CPU models. Buffers are still
            blended at once (the next forward writes them). Any ``torch.optim.Optimizer`` step waits for
            the pending update before it writes the weights, and so do this EMA's own methods (swaps,
            checkpoints, ``ema_model``, ``state_dict``). Off by default; see :mod:`emakit.overlap`. Code
            that writes the weights other than through ``Optimizer.step`` (SAM-style two-step optimizers,
            in-place edits), or reads a kept reference to ``ema_model``, calls :meth:`wait` first.

    The Trainer evaluates on the EMA weights once the average has started, and
    :class:`~emakit.callbacks.CheckpointSaver` saves them as the checkpoint's model weights (the training
    weights ride along in this algorithm's state, so resuming is exact).
    """

    averages_model = True

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
    ) -> None:
        explicit_half_life = half_life is not None and not isinstance(half_life, _DefaultHalfLife)
        if smoothing is not None and explicit_half_life:
            raise ValueError(
                f"give exactly one of half_life and smoothing, got half_life={half_life!r} and smoothing={smoothing!r}"
            )
        if smoothing is None and half_life is None:
            raise ValueError("give exactly one of half_life and smoothing, got neither")
        if not isinstance(fp32_ema, bool):
            raise TypeError(f"fp32_ema must be a bool, got {fp32_ema!r}")

        self.half_life: Time | None = None
        if smoothing is None:
            assert half_life is not None
            self.half_life = Time.coerce(half_life, "half_life", _UPDATE_UNITS)
            if self.half_life.value <= 0:
                raise ValueError(f"half_life must be greater than 0, got {str(self.half_life)!r}")
        default_interval = Time(1, self.half_life.unit) if self.half_life is not None else Time(1, TimeUnit.BATCH)
        self.update_interval: Time = (
            default_interval
            if update_interval is None
            else Time.coerce(update_interval, "update_interval", _UPDATE_UNITS)
        )
        if self.update_interval.value <= 0:
            raise ValueError(f"update_interval must be greater than 0, got {str(self.update_interval)!r}")
        if self.half_life is not None and self.update_interval.unit != self.half_life.unit:
            raise ValueError(
                f"update_interval must be in half_life's unit {self.half_life.unit.value!r}, "
                f"got update_interval={str(self.update_interval)!r} and half_life={str(self.half_life)!r}"
            )
        if smoothing is not None:
            self.smoothing = validate_smoothing(smoothing)
        else:
            assert self.half_life is not None
            self.smoothing = 2.0 ** (-self.update_interval.value / self.half_life.value)
        self.ema_start: Time = Time.coerce(ema_start, "ema_start")
        if self.ema_start.unit == TimeUnit.DURATION and self.ema_start.value > 1:
            raise ValueError(f"ema_start in 'dur' must be in [0, 1], got {str(self.ema_start)!r}")
        self.fp32_ema = fp32_ema
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
        self.skip_nonfinite = skip_nonfinite
        self.num_skipped_nonfinite = 0
        if not isinstance(flatten_model, bool):
            raise TypeError(f"flatten_model must be a bool, got {flatten_model!r}")
        self.flatten_model = flatten_model
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap must be a bool, got {overlap!r}")
        self.overlap = overlap
        self._overlap: Overlap | None = None
        self._overlap_device: torch.device | None = None
        #: Per tracked tensor, when it is blended with ``overlap`` (_NOW or _ALONGSIDE); a tuple kept as one
        #: object, so that the storage keeps its update plan between updates.
        self._phases: tuple[int, ...] | None = None
        #: Reads the training tensors; FlatStorage keeps its update plan while this same reader is passed.
        self._live_reader: Callable[[], list[torch.Tensor]] | None = None

        self.num_updates = 0
        self.start_count: int | None = None
        self._model: nn.Module | None = None
        self._names: list[str] = []
        self._slots: list[tuple[dict, str]] = []
        #: FSDP2-sharded model (DTensor parameters): the storage holds this rank's shards only.
        self._sharded = False
        self._storage: FlatStorage | None = None
        self._backup: FlatStorage | None = None
        self._swapped: nn.Module | None = None
        self._ema_model: nn.Module | None = None

    def __repr__(self) -> str:
        timing = f"half_life='{self.half_life}'" if self.half_life is not None else f"smoothing={self.smoothing}"
        return (
            f"EMA({timing}, update_interval='{self.update_interval}', ema_start='{self.ema_start}', "
            f"smoothing={self.smoothing:.6g})"
        )

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
    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by canonical name (live views of the EMA storage)."""
        self._require_started()
        assert self._storage is not None
        self.wait()
        return self._storage.state_dict()

    def _require_started(self) -> None:
        if not self.started:
            raise RuntimeError(
                f"the EMA has not started yet: it starts as a copy of the weights at the first "
                f"{'batch' if self.update_interval.unit == TimeUnit.BATCH else 'epoch'} end where training "
                f"progress reaches ema_start='{self.ema_start}'"
            )

    def attach(self, model: nn.Module) -> None:
        """Follow ``model``: the Trainer calls this at INIT. Tracks trainable parameters and all buffers."""
        if self._model is not None and unwrap_model(self._model) is not unwrap_model(model):
            raise RuntimeError("this EMA already follows another model; use one EMA per model")
        self.wait()  # flattening re-points the tensors a pending update reads
        self._model = model
        params = named_tensors(model, include_buffers=False)
        self._names = [n for n in named_tensors(model) if n not in params or params[n].requires_grad]
        self._slots = tensor_slots(model, self._names)
        self._sharded = is_sharded_model(model)
        if self.flatten_model and not self._sharded:
            flatten_model_(model)
        self._live_reader = self._live
        if self.overlap:
            self._setup_overlap(model, params)

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
        worker thread and re-raises its error, if any. The Trainer, optimizer steps and this EMA's methods
        call it where needed.
        """
        if self._overlap is not None:
            self._overlap.wait()

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
        if self._storage is None:
            self._storage = FlatStorage(sources, fp32_ema=self.fp32_ema)
            self._ema_model = None
        else:
            self._storage.copy_from(list(sources.values()))
        self.start_count = count
        self.num_updates = 0

    def update(self) -> None:
        """Blend the training weights into the average once (the Trainer calls this at update events)."""
        self._require_started()
        assert self._storage is not None
        self.wait()
        source: Callable[[], list[torch.Tensor]] | list[torch.Tensor] | None = self._live_reader
        if source is None or self._sharded or self._swapped is not None:  # a reusable plan only for plain models
            source = self._training_tensors()
        weight = 1.0 - self.smoothing
        if self._overlap is None:
            self._storage.blend(source, weight)
        else:
            plan = self._storage.prepare(source, self._phases)
            plan.run(weight, _NOW)
            self._overlap.launch(plan.bound(weight, _ALONGSIDE))
        self.num_updates += 1

    # ------------------------------------------------------------------ events
    def match(self, event: Event, state: State) -> bool:
        if event == Event.BATCH_END:
            return self.update_interval.unit == TimeUnit.BATCH
        if event == Event.EPOCH_END:
            return self.update_interval.unit == TimeUnit.EPOCH
        return event in (Event.INIT, Event.BATCH_START, Event.EVAL_START, Event.EVAL_END, Event.FIT_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_END:
            self.wait()  # fit() returns a finished average
        if event == Event.INIT:
            self._check_start(state.max_duration)
            self.attach(state.model)
        elif event in (Event.BATCH_END, Event.EPOCH_END):
            count = state.timestamp.get(self.update_interval.unit)
            if not self.started:
                due = reached(state.timestamp, self.ema_start, state.max_duration, state.batches_per_epoch)
                if due and self._finite_or_skip(count, logger):
                    self._initialise(count)
            elif count % int(self.update_interval.value) == 0 and self._finite_or_skip(count, logger):
                self.update()
        elif event == Event.EVAL_START:
            if self.started:
                self.get_ema_model(state.model)
        elif self._swapped is not None and self._is_own(self._swapped):  # EVAL_END, FIT_END, BATCH_START
            if event == Event.BATCH_START:
                warnings.warn(
                    "the EMA weights were still in the model at the start of a batch; training weights "
                    "restored (call ema.get_training_model(model) after using get_ema_model)",
                    stacklevel=2,
                )
            self.get_training_model(state.model)

    def _finite_or_skip(self, count: int, logger: Logger) -> bool:
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
            stacklevel=2,
        )
        logger.log_metrics({"ema/num_skipped_nonfinite": float(self.num_skipped_nonfinite)}, step=count)
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

    def _check_start(self, max_duration: Time) -> None:
        if self.ema_start.unit == max_duration.unit and self.ema_start > max_duration:
            raise ValueError(
                f"ema_start='{self.ema_start}' is after max_duration='{max_duration}': the EMA would never start"
            )

    # ------------------------------------------------------------------ swapping weights
    def get_ema_model(self, model: nn.Module) -> nn.Module:
        """Put the EMA weights into ``model`` (matched by canonical name) and return it.

        The training weights are kept aside until :meth:`get_training_model`. A no-op if ``model`` already
        holds the EMA weights.
        """
        self._require_started()
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

    @property
    def ema_model(self) -> nn.Module:
        """A module of the model's structure whose parameters and buffers are the EMA storage (no copy).

        In eval mode, without gradients; it follows the average as it updates. Frozen parameters are
        shared with the training model. fp16/bf16 models give an fp32 ``ema_model`` unless ``fp32_ema=False``.
        """
        self._require_started()
        self.wait()
        if self._ema_model is None:
            self._ema_model = self._build_ema_model()
        return self._ema_model

    def _build_ema_model(self) -> nn.Module:
        assert self._model is not None and self._storage is not None
        if self._sharded:
            raise RuntimeError(
                "ema_model is not available for a sharded (FSDP) model: each rank holds only its shards of the "
                "average. Use emakit.distributed.export_ema_weights(ema, path) to write the whole EMA to one file, "
                "or ema.get_ema_model(model) to run the sharded model on the EMA weights"
            )
        module = unwrap_model(self._model)
        memo: dict[int, Any] = {}
        for (table, key), name in zip(tensor_slots(module, self._names), self._names, strict=True):
            original = table[key]
            view = self._storage.tensors[name]
            memo[id(original)] = nn.Parameter(view, requires_grad=False) if isinstance(original, nn.Parameter) else view
        for param in module.parameters():
            memo.setdefault(id(param), param)
        ema_model = copy.deepcopy(module, memo)
        return ema_model.eval()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        self.wait()
        return {
            "started": self.started,
            "start_count": self.start_count,
            "num_updates": self.num_updates,
            "smoothing": self.smoothing,
            "num_skipped_nonfinite": self.num_skipped_nonfinite,
            "ema": self._as_model_tensors(self._storage.state_dict())
            if self.started and self._storage is not None
            else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"EMA state must be a dict, got {type(state).__name__}")
        self.wait()
        for key in ("started", "start_count", "num_updates", "ema"):
            if key not in state:
                raise ValueError(f"EMA state has no {key!r} entry; keys: {sorted(state)}")
        ema = state["ema"]
        if state["started"]:
            if self._model is None:
                raise RuntimeError("attach the EMA to its model (Trainer INIT or ema.attach) before loading its state")
            if not isinstance(ema, Mapping):
                raise ValueError("EMA state is marked started but holds no 'ema' tensors")
            live = dict(zip(self._names, self._model_tensors() if self._sharded else self._live(), strict=True))
            check_state_matches(ema, live, "EMA state")
            if self._sharded:  # keep this rank's shards
                ema = {name: local_tensor(t) for name, t in ema.items()}
                live = dict(zip(self._names, self._live(), strict=True))
            saved_smoothing = state.get("smoothing")
            if isinstance(saved_smoothing, float) and not math.isclose(saved_smoothing, self.smoothing):
                warnings.warn(
                    f"resuming an EMA saved with smoothing={saved_smoothing:.6g} with smoothing={self.smoothing:.6g}",
                    stacklevel=2,
                )
            if self._storage is None:
                self._storage = FlatStorage(live, fp32_ema=self.fp32_ema)
                self._ema_model = None
            self._storage.load_state_dict(ema)
            self.start_count = int(state["start_count"])
        else:
            self._storage = None
            self._ema_model = None
            self.start_count = None
        self.num_updates = int(state["num_updates"])
        self.num_skipped_nonfinite = int(state.get("num_skipped_nonfinite", 0))

    def checkpoint_model_state(
        self, model_state: dict[str, Any], algorithm_state: dict[str, Any], publish: bool
    ) -> dict[str, Any]:
        self.wait()
        model_state = dict(model_state)
        if self._backup is not None and self._swapped is not None and self._is_own(self._swapped):
            backup = self._as_model_tensors(dict(zip(self._names, self._backup.views(), strict=True)))
            for name, tensor in backup.items():
                if name in model_state:
                    model_state[name] = tensor
        if publish and self.started:
            assert self._storage is not None
            replaced = [n for n in self._names if n in model_state]
            algorithm_state["training_weights"] = {n: model_state[n] for n in replaced}
            ema = self._as_model_tensors(self._storage.tensors)
            for name in replaced:
                model_state[name] = ema[name]
        return model_state

    def restore_model_state(self, model_state: dict[str, Any], algorithm_state: dict[str, Any]) -> dict[str, Any]:
        training = algorithm_state.get("training_weights")
        if training is None:
            return model_state
        if not isinstance(training, Mapping):
            raise ValueError("EMA state's 'training_weights' must be a dict of tensors")
        unknown = [n for n in training if n not in model_state]
        if unknown:
            raise ValueError(f"EMA state's training weights have a tensor {unknown[0]!r} the checkpoint's model lacks")
        return {**model_state, **training}
