"""The EMA algorithm: an exponential moving average of the model's weights, run by the Trainer."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from emakit.core.algorithm import Algorithm
from emakit.core.event import Event
from emakit.functional import named_tensors, tensor_slots, unwrap_model, validate_smoothing
from emakit.storage import FlatStorage, check_state_matches
from emakit.time import Time, TimeUnit, reached

if TYPE_CHECKING:
    from emakit.core.logger import Logger
    from emakit.core.state import State

__all__ = ["EMA"]


class _DefaultHalfLife(str):
    """Marks the default ``half_life`` so that ``EMA(smoothing=0.99)`` works without ``half_life=None``."""


_DEFAULT_HALF_LIFE = _DefaultHalfLife("1000ba")
_UPDATE_UNITS = (TimeUnit.BATCH, TimeUnit.EPOCH)


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

        self.num_updates = 0
        self.start_count: int | None = None
        self._model: nn.Module | None = None
        self._names: list[str] = []
        self._slots: list[tuple[dict, str]] = []
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
        self._model = model
        params = named_tensors(model, include_buffers=False)
        self._names = [n for n in named_tensors(model) if n not in params or params[n].requires_grad]
        self._slots = tensor_slots(model, self._names)

    def _live(self, model: nn.Module | None = None) -> list[torch.Tensor]:
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
        self._storage.blend(self._training_tensors(), 1.0 - self.smoothing)
        self.num_updates += 1

    # ------------------------------------------------------------------ events
    def match(self, event: Event, state: State) -> bool:
        if event == Event.BATCH_END:
            return self.update_interval.unit == TimeUnit.BATCH
        if event == Event.EPOCH_END:
            return self.update_interval.unit == TimeUnit.EPOCH
        return event in (Event.INIT, Event.BATCH_START, Event.EVAL_START, Event.EVAL_END, Event.FIT_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._check_start(state.max_duration)
            self.attach(state.model)
        elif event in (Event.BATCH_END, Event.EPOCH_END):
            count = state.timestamp.get(self.update_interval.unit)
            if not self.started:
                if reached(state.timestamp, self.ema_start, state.max_duration, state.batches_per_epoch):
                    self._initialise(count)
            elif count % int(self.update_interval.value) == 0:
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
        if self._ema_model is None:
            self._ema_model = self._build_ema_model()
        return self._ema_model

    def _build_ema_model(self) -> nn.Module:
        assert self._model is not None and self._storage is not None
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
        return {
            "started": self.started,
            "start_count": self.start_count,
            "num_updates": self.num_updates,
            "smoothing": self.smoothing,
            "ema": self._storage.state_dict() if self.started and self._storage is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"EMA state must be a dict, got {type(state).__name__}")
        for key in ("started", "start_count", "num_updates", "ema"):
            if key not in state:
                raise ValueError(f"EMA state has no {key!r} entry; keys: {sorted(state)}")
        ema = state["ema"]
        if state["started"]:
            if self._model is None:
                raise RuntimeError("attach the EMA to its model (Trainer INIT or ema.attach) before loading its state")
            if not isinstance(ema, Mapping):
                raise ValueError("EMA state is marked started but holds no 'ema' tensors")
            live = dict(zip(self._names, self._live(), strict=True))
            check_state_matches(ema, live, "EMA state")
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

    def checkpoint_model_state(
        self, model_state: dict[str, Any], algorithm_state: dict[str, Any], publish: bool
    ) -> dict[str, Any]:
        model_state = dict(model_state)
        if self._backup is not None and self._swapped is not None and self._is_own(self._swapped):
            for name, tensor in zip(self._names, self._backup.views(), strict=True):
                if name in model_state:
                    model_state[name] = tensor
        if publish and self.started:
            assert self._storage is not None
            replaced = [n for n in self._names if n in model_state]
            algorithm_state["training_weights"] = {n: model_state[n] for n in replaced}
            for name in replaced:
                model_state[name] = self._storage.tensors[name]
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
