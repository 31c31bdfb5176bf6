"""What a checkpoint holds: building it from a run's State and applying it back.

A checkpoint is a dict of plain data and tensors::

    {
      "format": "emakit.checkpoint", "version": 1, "emakit_version": "...",
      "model_weights": "published" | "training",   # what state.model holds (see below)
      "state": {
        "model":      canonical-name state_dict (no "module." / "_orig_mod." prefixes),
        "optimizers": [optimizer.state_dict(), ...],
        "schedulers": [scheduler.state_dict(), ...],
        "algorithms": {name: algorithm.state_dict() (+ what publishing moved there)},
        "callbacks":  {name: callback.state_dict()},
        "timestamp":  {"epoch", "batch", "sample", "batch_in_epoch", "sample_in_epoch"},
        "rng":        {"now": ..., "epoch_start": ... or None},
        "max_duration": "10ep",
      },
    }

"published" checkpoints (written by CheckpointSaver) carry the weights algorithms publish, the EMA's, as
``state.model``; the training weights then sit in the algorithm's state, under ``"training_weights"``.
"training" checkpoints (``Trainer.save_checkpoint``) carry the training weights as ``state.model``.

A run resumed without an algorithm the checkpoint was written with still gets the training weights: they
are read from that algorithm's ``"training_weights"``, and a warning says that its state is not used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from emakit._version import __version__
from emakit.checkpoint.files import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from emakit.core.state import State
from emakit.engine.naming import canonical_name, unwrap_model
from emakit.rng import capture_rng, loader_generators

__all__ = ["TRAINING_WEIGHTS", "apply_checkpoint", "build_checkpoint", "model_state_dict", "unique_names"]

#: The key under which an algorithm that publishes its weights keeps the training weights they replaced.
TRAINING_WEIGHTS = "training_weights"


def unique_names(objects: list[Any]) -> list[str]:
    """The objects' ``name``s, made unique with ``_2``, ``_3`` suffixes: their keys in a checkpoint."""
    names: list[str] = []
    for obj in objects:
        base = obj.name
        name, i = base, 1
        while name in names:
            i += 1
            name = f"{base}_{i}"
        names.append(name)
    return names


def model_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` of the unwrapped module under canonical names."""
    return {canonical_name(k): v for k, v in unwrap_model(model).state_dict().items()}


def build_checkpoint(state: State, *, publish: bool) -> dict[str, Any]:
    """The checkpoint dict for ``state``. ``publish`` lets algorithms put their weights in ``state.model``."""
    model = model_state_dict(state.model)
    algorithms: dict[str, Any] = {}
    for name, algorithm in zip(unique_names(state.algorithms), state.algorithms, strict=True):
        algorithm_state = algorithm.state_dict()
        model = algorithm.checkpoint_model_state(model, algorithm_state, publish)
        algorithms[name] = algorithm_state
    callbacks = {name: cb.state_dict() for name, cb in zip(unique_names(state.callbacks), state.callbacks, strict=True)}
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "emakit_version": __version__,
        "model_weights": "published" if publish else "training",
        "state": {
            "model": model,
            "optimizers": [opt.state_dict() for opt in state.optimizers],
            "schedulers": [sch.state_dict() for sch in state.schedulers],
            "algorithms": algorithms,
            "callbacks": callbacks,
            "timestamp": state.timestamp.state_dict(),
            "rng": {
                "now": capture_rng(loader_generators(state.train_dataloader)),
                "epoch_start": state.epoch_start_rng,
            },
            "max_duration": str(state.max_duration),
        },
    }


def apply_checkpoint(
    state: State,
    checkpoint: dict[str, Any],
    source: str = "checkpoint",
    load_optimizers: Callable[[], None] | None = None,
) -> None:
    """Load ``checkpoint`` into ``state``: training weights into the model, then everything else.

    Everything is checked before anything is changed, so a mismatched checkpoint leaves the run untouched.
    ``load_optimizers`` replaces loading ``saved["optimizers"]`` one by one (sharded checkpoints keep one
    optimizer state keyed by parameter name, see :mod:`emakit.distributed`).
    """
    saved = checkpoint["state"]
    algorithms_saved: dict[str, Any] = saved["algorithms"]
    names = unique_names(state.algorithms)
    model_state = saved["model"]
    for name, algorithm in zip(names, state.algorithms, strict=True):
        model_state = algorithm.restore_model_state(model_state, algorithms_saved.get(name, {}))
    model_state, unused = _without_absent_algorithms(model_state, algorithms_saved, names, source)

    module = unwrap_model(state.model)
    own = {canonical_name(k): k for k in module.state_dict()}
    missing = [k for k in own if k not in model_state]
    unexpected = [k for k in model_state if k not in own]
    if missing:
        raise ValueError(
            f"{source}: model tensor {missing[0]!r} is missing from the checkpoint ({len(missing)} missing)"
        )
    if unexpected:
        raise ValueError(f"{source}: checkpoint has tensor {unexpected[0]!r}, which the model does not have")
    current = module.state_dict()
    for name, key in own.items():
        value = model_state[name]
        if not isinstance(value, torch.Tensor) or value.shape != current[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{source}: tensor {name!r} has shape {shape} in the checkpoint, {tuple(current[key].shape)} in the model"
            )
    for what, expected, got in (
        ("optimizers", len(state.optimizers), len(saved["optimizers"]) if load_optimizers is None else None),
        ("schedulers", len(state.schedulers), len(saved["schedulers"])),
    ):
        if got is not None and expected != got:
            raise ValueError(f"{source}: checkpoint has {got} {what}, the trainer has {expected}")
    missing_algorithms = [n for n in names if n not in algorithms_saved]
    if missing_algorithms:
        raise ValueError(f"{source}: checkpoint has no state for algorithm {missing_algorithms[0]!r}")

    # Algorithms check their state against the model before changing anything, so they load first.
    for name, algorithm in zip(names, state.algorithms, strict=True):
        algorithm.load_state_dict(algorithms_saved[name])
    module.load_state_dict({own[name]: model_state[name] for name in own})
    if load_optimizers is not None:
        load_optimizers()
    else:
        for opt, opt_state in zip(state.optimizers, saved["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
    for sch, sch_state in zip(state.schedulers, saved["schedulers"], strict=True):
        sch.load_state_dict(sch_state)
    callbacks_saved: dict[str, Any] = saved.get("callbacks", {})
    for name, cb in zip(unique_names(state.callbacks), state.callbacks, strict=True):
        if name in callbacks_saved:
            cb.load_state_dict(callbacks_saved[name])
    state.timestamp.load_state_dict(saved["timestamp"])
    state.epoch_start_rng = saved["rng"]["epoch_start"]
    for message in unused:
        warnings.warn(message, stacklevel=3)


def _without_absent_algorithms(
    model_state: dict[str, Any], algorithms_saved: Mapping[str, Any], names: list[str], source: str
) -> tuple[dict[str, Any], list[str]]:
    """The training weights when the checkpoint has state for algorithms this run lacks, and what to warn.

    An algorithm that published its weights (the EMA's) as the checkpoint's model kept the training weights
    under :data:`TRAINING_WEIGHTS`: those are the weights to train on, not the published ones.
    """
    unused: list[str] = []
    for name, saved in algorithms_saved.items():
        if name in names or not saved:
            continue
        training = saved.get(TRAINING_WEIGHTS) if isinstance(saved, Mapping) else None
        if training is None:
            unused.append(f"{source} holds state for algorithm {name!r}, which this run does not have: it is not used")
            continue
        if not isinstance(training, Mapping):
            raise ValueError(f"{source}: algorithm {name!r}'s {TRAINING_WEIGHTS!r} must be a dict of tensors")
        unknown = [n for n in training if n not in model_state]
        if unknown:
            raise ValueError(
                f"{source}: algorithm {name!r}'s training weights have a tensor {unknown[0]!r} the model state lacks"
            )
        model_state = {**model_state, **training}
        unused.append(
            f"{source} was written with algorithm {name!r}, which this run does not have: the checkpoint's model "
            f"weights are the ones {name!r} published, so the training weights stored beside them were loaded "
            "instead, and its state is not used"
        )
    return model_state, unused
