"""Capture and restore every random number generator a training run draws from.

States are stored as tensors, ints and lists so that checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "loader_generators", "restore_rng"]


def loader_generators(loader: object) -> list[torch.Generator]:
    """The generators a DataLoader's shuffling draws from besides the global one (if it was given any)."""
    found: list[torch.Generator] = []
    candidates: Iterable[object] = (
        getattr(loader, "generator", None),
        getattr(getattr(loader, "sampler", None), "generator", None),
        getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None),
    )
    for gen in candidates:
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def capture_rng(generators: Sequence[torch.Generator] = ()) -> dict[str, Any]:
    """Snapshot of python's, numpy's, torch's (CPU and CUDA) and the given generators' states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }


def restore_rng(state: dict[str, Any], generators: Sequence[torch.Generator] = ()) -> None:
    """Restore what :func:`capture_rng` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state["generators"]
    if len(saved) != len(generators):
        raise ValueError(
            f"checkpoint holds {len(saved)} data loader generator state(s) but the loader has {len(generators)}"
        )
    for gen, gen_state in zip(generators, saved, strict=True):
        gen.set_state(gen_state)
