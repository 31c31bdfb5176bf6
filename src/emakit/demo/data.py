"""The demo's data: scikit-learn's digits (bundled, no download) or a user's ``.npz``, split once.

The validation split is fixed (its own seed, stratified by class) so that runs with different ``--seed``
values are compared on the same validation images.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["SPLIT_SEED", "VAL_FRACTION", "DemoData", "load_arrays", "load_data", "load_digits_arrays", "split_arrays"]

#: Fraction of each class held out for validation.
VAL_FRACTION = 0.2
#: Seed of the train/validation split; fixed, independent of the training seed.
SPLIT_SEED = 0


@dataclass
class DemoData:
    """Standardised tensors of both splits and what a model needs to know about them.

    ``x_*`` are float32: ``(N, C, H, W)`` for images, ``(N, F)`` for flat features. ``y_*`` are int64 class
    indices into ``classes`` (the original labels, sorted). ``mean``/``std`` are the training split's
    statistics the inputs were standardised with (one number for images, one per feature otherwise).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]
    source: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(images (1797, 8, 8) float32 in 0..16, labels (1797,) int64)``.

    Reads the CSV that scikit-learn ships without importing scikit-learn (which takes seconds), falling
    back to ``sklearn.datasets.load_digits`` if the file is not where this version keeps it.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        csv = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
            if table.shape == (1797, 65):
                return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.asarray(digits.images, dtype=np.float32), np.asarray(digits.target, dtype=np.int64)


def load_arrays(path: str | os.PathLike[str] | None) -> tuple[np.ndarray, np.ndarray, str]:
    """``(x, y, source)`` from ``path`` (an ``.npz`` with arrays ``x`` and ``y``), or the digits for None.

    Raises:
        ValueError: the file is missing, unreadable, lacks ``x`` or ``y``, or its arrays have the wrong
            shapes or types.
    """
    if path is None:
        x, y = load_digits_arrays()
        return x, y, "scikit-learn digits"
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{str(file)!r} does not exist or is not a file")
    if not zipfile.is_zipfile(file):
        raise ValueError(f"{str(file)!r} is not a .npz archive (numpy.savez(path, x=..., y=...) writes one)")
    try:
        with np.load(file, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise ValueError(
                    f"{str(file)!r} has no array {missing[0]!r}; it needs arrays 'x' and 'y', has {sorted(npz.files)}"
                )
            x, y = npz["x"], npz["y"]
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{str(file)!r} is not a readable .npz file ({type(e).__name__}: {e})") from None
    except ValueError as e:
        if "has no array" in str(e):
            raise
        # np.load refuses object arrays without allow_pickle, and garbage that is not an npz at all.
        raise ValueError(f"{str(file)!r} cannot be read as a .npz of numeric arrays ({e})") from None
    return x, y, str(file)


def _check_arrays(x: np.ndarray, y: np.ndarray) -> None:
    if x.dtype.kind not in "biuf":
        raise ValueError(f"'x' must hold numbers, got dtype {x.dtype}")
    if x.ndim not in (2, 3, 4):
        raise ValueError(
            f"'x' must have shape (N, features), (N, H, W) or (N, C, H, W), got shape {tuple(x.shape)} ({x.ndim} dims)"
        )
    if y.ndim != 1:
        raise ValueError(f"'y' must be one class label per sample, shape (N,), got shape {tuple(y.shape)}")
    if y.dtype.kind not in "biuU":
        raise ValueError(f"'y' must hold integer or string class labels, got dtype {y.dtype}")
    if len(x) != len(y):
        raise ValueError(f"'x' and 'y' must have the same length, got {len(x)} and {len(y)}")
    if any(d == 0 for d in x.shape[1:]):
        raise ValueError(f"'x' has an empty dimension: shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("'x' holds NaN or infinite values")


def split_arrays(y: np.ndarray, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED) -> tuple[np.ndarray, ...]:
    """Stratified ``(train_idx, val_idx)``: about ``val_fraction`` of each class (rounded) goes to validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        n_val = int(np.floor(len(idx) * val_fraction + 0.5))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load_data(path: str | os.PathLike[str] | None = None) -> DemoData:
    """Load, check, split and standardise the demo's data (digits when ``path`` is None).

    Images ``(N, H, W)`` become ``(N, 1, H, W)``; images are standardised with one mean and std over the
    training split, flat features per feature. The same inputs always give the same split.

    Raises:
        ValueError: the data is missing or malformed; the message says what was expected.
    """
    x, y, source = load_arrays(path)
    _check_arrays(x, y)
    classes, y_index = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"'y' must hold at least 2 classes, got {len(classes)}")
    train_idx, val_idx = split_arrays(y_index)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise ValueError(f"too few samples ({len(y)}) for a train/validation split; give a few samples per class")
    x = x.astype(np.float32, copy=False)
    if x.ndim == 3:
        x = x[:, None]
    x_train = x[train_idx]
    if x.ndim == 2:
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
    else:
        mean = np.asarray([x_train.mean()], dtype=np.float32)
        std = np.asarray([x_train.std()], dtype=np.float32)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    x = (x - mean.reshape((1, -1) if x.ndim == 2 else (1,))) / std.reshape((1, -1) if x.ndim == 2 else (1,))
    x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    y_t = torch.from_numpy(y_index.astype(np.int64))
    return DemoData(
        x_train=x_t[train_idx],
        y_train=y_t[train_idx],
        x_val=x_t[val_idx],
        y_val=y_t[val_idx],
        classes=[str(c) for c in classes],
        mean=[float(m) for m in mean],
        std=[float(s) for s in std],
        source=source,
    )
