"""The checkpoint format: building, writing (atomically), reading (``weights_only``) and applying it.

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
``state.model``; the training weights then sit in the algorithm's state. "training" checkpoints
(``Trainer.save_checkpoint``) carry the training weights as ``state.model``.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from emakit.core.state import State
from emakit.functional import canonical_name, unwrap_model
from emakit.rng import capture_rng, loader_generators

__all__ = [
    "CHECKPOINT_FORMAT",
    "apply_checkpoint",
    "build_checkpoint",
    "check_checkpoint_format",
    "list_checkpoints",
    "load_checkpoint_file",
    "model_state_dict",
    "newest_loadable_checkpoint",
    "remove_stale_temporaries",
    "save_checkpoint_file",
    "unreadable_checkpoint",
]

CHECKPOINT_FORMAT = "emakit.checkpoint"
CHECKPOINT_VERSION = 1


def _unique_names(objects: list[Any]) -> list[str]:
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
    from emakit import __version__

    model = model_state_dict(state.model)
    algorithms: dict[str, Any] = {}
    for name, algorithm in zip(_unique_names(state.algorithms), state.algorithms, strict=True):
        algorithm_state = algorithm.state_dict()
        model = algorithm.checkpoint_model_state(model, algorithm_state, publish)
        algorithms[name] = algorithm_state
    callbacks = {
        name: cb.state_dict() for name, cb in zip(_unique_names(state.callbacks), state.callbacks, strict=True)
    }
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


def save_checkpoint_file(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    A crash at any moment leaves either the previous file or the new one at ``path``, never a partial one.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``: a file cannot run code when loaded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable emakit checkpoint (truncated, corrupt, foreign, or it
            carries objects other than tensors and plain data).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        raise unreadable_checkpoint(path, e) from e
    check_checkpoint_format(checkpoint, f"checkpoint {str(path)!r}")
    return checkpoint


def unreadable_checkpoint(path: str | os.PathLike[str], cause: BaseException) -> ValueError:
    """The error for a checkpoint that cannot be read with ``weights_only``, quoting the cause's first line."""
    first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return ValueError(f"checkpoint {str(path)!r} cannot be read safely: {first_line}")


def check_checkpoint_format(checkpoint: object, source: str) -> None:
    """Raise ValueError unless ``checkpoint`` is a dict in the format and version this emakit writes."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{source} is not an emakit checkpoint (no 'format': {CHECKPOINT_FORMAT!r} entry)")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{source} has format version {checkpoint.get('version')!r}; this emakit reads version {CHECKPOINT_VERSION}"
        )


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
    names = _unique_names(state.algorithms)
    model_state = saved["model"]
    for name, algorithm in zip(names, state.algorithms, strict=True):
        model_state = algorithm.restore_model_state(model_state, algorithms_saved.get(name, {}))

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
    for name, cb in zip(_unique_names(state.callbacks), state.callbacks, strict=True):
        if name in callbacks_saved:
            cb.load_state_dict(callbacks_saved[name])
    state.timestamp.load_state_dict(saved["timestamp"])
    state.epoch_start_rng = saved["rng"]["epoch_start"]


_CHECKPOINT_NAME = re.compile(r"^ep(\d+)-ba(\d+)\.pt$")


def list_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint files ``ep{E}-ba{B}.pt`` in ``folder``, oldest first (by batch, then epoch)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found: list[tuple[int, int, Path]] = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(2)), int(match.group(1)), path))
    return [path for _, _, path in sorted(found)]


def newest_loadable_checkpoint(folder: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that reads back whole, with its contents; None if there is none.

    A truncated or corrupt newer file (a crash mid-write on a filesystem without atomic rename, a disk
    error) is reported with a warning and skipped.
    """
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint_file(path)
        except ValueError as e:
            warnings.warn(f"skipping unreadable checkpoint: {e}", stacklevel=2)
    return None


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files that writes interrupted by a crash left in ``folder``; return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [
        p
        for p in folder.iterdir()
        if p.name.startswith(".") and p.name.endswith(".tmp") and (p.is_file() or p.is_symlink())
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
