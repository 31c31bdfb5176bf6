"""What the EMA saves and publishes: its own state for an exact resume, and model states for checkpoints.

The format of :meth:`Averager.state_dict` is written and read here only (:func:`averager_state`, :func:`read_state`,
which checks everything before the EMA changes anything). :func:`training_model_state` and
:func:`published_model_state` give a model state with the training weights, or with the average, for the
tracked tensors under every name they are saved as (tied weights included).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from emakit.averaging import replicated
from emakit.averaging.schedules import Schedule
from emakit.averaging.snapshots import SnapshotSeries
from emakit.averaging.tracked import TrackedModel
from emakit.engine.storage import FlatStorage, check_state_matches
from emakit.parallel.sharding import local_tensor
from emakit.parallel.zero import check_partitions
from emakit.posthoc.profiles import Profile, profile_from_dict
from emakit.time import Timestamp

__all__ = [
    "Restored",
    "averager_state",
    "keys_of_tracked",
    "published_model_state",
    "read_state",
    "training_model_state",
]


def averager_state(
    *,
    started: bool,
    start_count: int | None,
    n_averaged: int,
    schedule: Schedule,
    num_skipped_nonfinite: int,
    timestamp: Timestamp,
    averages: Sequence[dict[str, torch.Tensor]],
    snapshots: SnapshotSeries,
    window_closed: bool,
    bn_updated: bool,
    rank_buffers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The averager's state dict; ``averages`` are the tracked averages as the model's tensors (none before the start),
    ``rank_buffers`` this rank's own replicated buffers under FSDP2 (:mod:`.replicated`; left out when None).

    ``num_updates`` counts the blends after the start (``n_averaged - 1``), the key's meaning since the first release.
    """
    state = {
        "started": started,
        "start_count": start_count,
        "num_updates": max(n_averaged - 1, 0),
        "smoothing": schedule.smoothing,
        "num_skipped_nonfinite": num_skipped_nonfinite,
        "timestamp": timestamp.state_dict(),
        "ema": averages[0] if averages else None,
        # the other tracked averages (half_life or sigma_rel lists), and where the snapshot series stands
        "more_averages": list(averages[1:]),
        "snapshot_index": snapshots.index,
        # the run id of the snapshot series (in every snapshot's metadata), and the averages' profiles
        "snapshot_run": snapshots.run,
        "profiles": [p.to_dict() for p in schedule.profiles],
        "warmup": _warmup_of(schedule),
        "window_closed": window_closed,
        "bn_updated": bn_updated,
    }
    if rank_buffers is not None:
        state[replicated.RANK_KEY] = rank_buffers
    if snapshots.start is not None:  # theta_0 until the first raw snapshot holds it (snapshot_raw=True)
        state["snapshot_start"] = snapshots.start
    return state


@dataclass
class Restored:
    """A checked averager state, ready to apply: ``averages`` (this rank's tensors by name) is None before the start."""

    averages: list[dict[str, torch.Tensor]] | None
    #: The tracked tensors by name, shaping new storages for ``averages``.
    live: dict[str, torch.Tensor]
    start_count: int | None
    n_averaged: int
    num_skipped_nonfinite: int
    timestamp: Timestamp | None
    snapshot_index: int
    #: The run id of the saved snapshot series (None for states from before run ids were kept).
    snapshot_run: str | None
    #: theta_0 kept for the first raw snapshot, when the state was saved before it was written.
    snapshot_start: dict[str, torch.Tensor] | None
    window_closed: bool
    bn_updated: bool


def read_state(state: Any, tracked: TrackedModel, schedule: Schedule, stacklevel: int = 2) -> Restored:
    """Check ``state`` (from :func:`averager_state`) against the followed model and the averages tracked.

    A different ``smoothing`` or warm-up only warns (``stacklevel`` as :func:`warnings.warn` counts it from this
    function); a state of power profiles (``sigma_rel``) for an EMA of constant smoothing, or the reverse, and
    anything else that cannot be restored raises, naming what is wrong.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"EMA state must be a dict, got {type(state).__name__}")
    for key in ("started", "start_count", "num_updates", "ema"):
        if key not in state:
            raise ValueError(f"EMA state has no {key!r} entry; keys: {sorted(state)}")
    timestamp = None
    if state.get("timestamp") is not None:
        timestamp = Timestamp()
        timestamp.load_state_dict(dict(state["timestamp"]))
    averages = None
    live: dict[str, torch.Tensor] = {}
    if state["started"]:
        ema = state["ema"]
        if tracked.model is None:
            raise RuntimeError("attach the EMA to its model (ema.attach(model)) before loading its state")
        if not isinstance(ema, Mapping):
            raise ValueError("EMA state is marked started but holds no 'ema' tensors")
        saved = [ema, *(state.get("more_averages") or [])]
        if len(saved) != schedule.num_averages:
            raise ValueError(
                f"EMA state holds {len(saved)} average(s), this {schedule.averager_name} tracks {schedule.num_averages}: "
                "resume with the same half_life / sigma_rel list"
            )
        live = dict(zip(tracked.names, tracked.model_tensors() if tracked.sharded else tracked.live(), strict=True))
        for average in saved:
            if tracked.zero3:  # ZeRO-3: partitions of another world size are refused by name (parallel/zero.py)
                check_partitions(average, live, "EMA state")
            check_state_matches(average, live, "EMA state", _selection_hint(average, live))
        if tracked.sharded:  # keep this rank's shards
            saved = [{name: local_tensor(t) for name, t in average.items()} for average in saved]
            saved = replicated.own_averages(state, saved)  # FSDP2: this rank's own replicated buffers
            live = dict(zip(tracked.names, tracked.masters(tracked.live()), strict=True))  # ZeRO-3: as started
        saved_smoothing = state.get("smoothing")
        smoothing = schedule.smoothing
        _check_same_kind(saved_smoothing, state.get("profiles"), smoothing, schedule.profiles)
        if (
            isinstance(saved_smoothing, float)
            and not (math.isnan(saved_smoothing) and math.isnan(smoothing))
            and not math.isclose(saved_smoothing, smoothing)
        ):
            warnings.warn(
                f"resuming an EMA saved with smoothing={saved_smoothing:.6g} with smoothing={smoothing:.6g}",
                stacklevel=stacklevel,
            )
        _check_warmup(state, schedule, stacklevel + 1)
        averages = saved
    return Restored(
        averages=averages,
        live=live,
        start_count=int(state["start_count"]) if averages is not None else None,
        n_averaged=int(state["num_updates"]) + 1 if averages is not None else 0,
        num_skipped_nonfinite=int(state.get("num_skipped_nonfinite", 0)),
        timestamp=timestamp,
        snapshot_index=int(state.get("snapshot_index", 0)),
        snapshot_run=state.get("snapshot_run"),
        snapshot_start=_snapshot_start(state.get("snapshot_start"), live),
        # states of the first SWA kept these under the names below
        window_closed=bool(state.get("window_closed", state.get("swa_window_closed", False))),
        bn_updated=bool(state.get("bn_updated", state.get("swa_bn_updated", False))),
    )


def _snapshot_start(saved: Any, live: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The saved theta_0 of a raw snapshot series, checked against the tracked tensors' names."""
    if saved is None:
        return None
    if not isinstance(saved, Mapping) or set(saved) != set(live):
        names = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
        raise ValueError(
            f"EMA state's snapshot_start (theta_0 for the first raw snapshot) must hold the tracked tensors "
            f"{sorted(live)}, got {names}"
        )
    return dict(saved)


def _warmup_of(schedule: Schedule) -> dict[str, float] | None:
    warmup = getattr(schedule, "warmup", None)
    return None if warmup is None else {"gamma": warmup.gamma, "power": warmup.power}


def _check_warmup(state: Mapping[str, Any], schedule: Schedule, stacklevel: int) -> None:
    """Warn if the state was saved with another warm-up (on, off or other parameters): the ramp then changes."""
    if "warmup" not in state:  # states from before warm-up was saved
        return
    saved, now = state["warmup"], _warmup_of(schedule)
    if saved != now:
        warnings.warn(
            f"resuming an EMA saved with warmup={saved} with warmup={now}: the smoothing of the coming updates "
            "follows the new setting",
            stacklevel=stacklevel,
        )


def _selection_hint(saved: Mapping[str, Any], live: Mapping[str, Any]) -> str:
    """Why a state's tensors may differ from the tracked ones: the ``params``/``buffers`` selection."""
    if set(saved) == set(live):
        return ""
    return (
        " (the averager tracks the tensors its params= and buffers= select; a state saved with another selection "
        "resumes only with that selection)"
    )


def _describe_averages(smoothing: Any, profiles: Sequence[Profile]) -> str:
    shown = f"profiles {[str(p) for p in profiles]}" if profiles else ""
    if isinstance(smoothing, float) and not math.isnan(smoothing):
        return f"smoothing={smoothing:.6g} (half_life or smoothing)" + (f", {shown}" if shown else "")
    return "sigma_rel power profiles, whose smoothing changes every update" + (f" ({shown})" if shown else "")


def _check_same_kind(saved_smoothing: Any, saved_profiles: Any, smoothing: float, profiles: Sequence[Profile]) -> None:
    """ValueError if the state's averages are power profiles and this EMA's constant ones, or the reverse."""
    if not isinstance(saved_smoothing, float) or math.isnan(saved_smoothing) == math.isnan(smoothing):
        return
    try:
        saved = [profile_from_dict(p) for p in saved_profiles or []]
    except (TypeError, ValueError):
        saved = []
    raise ValueError(
        f"EMA state was saved by an EMA with {_describe_averages(saved_smoothing, saved)}; this EMA has "
        f"{_describe_averages(smoothing, profiles)}. A power-profile average cannot continue as a constant-"
        "smoothing one or the reverse: resume with the half_life / smoothing / sigma_rel the state was saved with"
    )


def keys_of_tracked(tracked: TrackedModel, model_state: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(state key, tracked name) for every key holding a tracked tensor: its own name, and the other names of
    tied weights (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``), which must get the same value."""
    pairs = [(name, name) for name in tracked.names if name in model_state]
    owner: dict[tuple[int, torch.Size, torch.dtype], str] = {}
    for name, tensor in zip(tracked.names, tracked.live(), strict=True):
        if tensor.numel():
            owner[(tensor.data_ptr(), tensor.shape, tensor.dtype)] = name
    names = set(tracked.names)
    for key, value in model_state.items():
        # sharded: the shards (a DTensor's local tensor, a ZeRO-3 partition) of tied weights are the same memory
        local = local_tensor(value) if isinstance(value, torch.Tensor) else None
        if key not in names and local is not None and local.numel():
            found = owner.get((local.data_ptr(), local.shape, local.dtype))
            if found is not None:
                pairs.append((key, found))
    return pairs


def training_model_state(
    tracked: TrackedModel, model_state: Mapping[str, Any], backup: Mapping[str, torch.Tensor] | None
) -> dict[str, Any]:
    """``model_state`` with the training weights for the tracked tensors: from ``backup`` (by tracked name)
    while the EMA weights are swapped into the model, as they are otherwise."""
    state = dict(model_state)
    if backup is not None:
        training = tracked.as_model_tensors(backup)
        for key, name in keys_of_tracked(tracked, model_state):
            state[key] = training[name]
    return state


def published_model_state(
    tracked: TrackedModel, model_state: Mapping[str, Any], training_state: Mapping[str, Any], average: FlatStorage
) -> dict[str, Any]:
    """``training_state`` (:func:`training_model_state` of ``model_state``) with ``average``, in each tensor's
    dtype, for the tracked tensors (found in ``model_state``, whose tensors are the model's own). Under FSDP2
    the replicated floating buffers are their mean over the ranks (:mod:`.replicated`: a collective)."""
    state = dict(training_state)
    ema = tracked.as_model_tensors(
        {
            name: t if name not in state or t.dtype == state[name].dtype else t.to(state[name].dtype)
            for name, t in average.tensors.items()
        }
    )
    for key, name in keys_of_tracked(tracked, model_state):
        state[key] = ema[name]
    return replicated.mean_over_ranks(state, replicated.replicated_buffers(tracked))
