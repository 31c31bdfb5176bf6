"""Batches as emakit's Trainer reads them: moving one to a device, counting its samples, and a model's loss on it.

A batch is an ``(inputs, targets)`` pair, unless the model defines ``loss(outputs, batch)``: then the model
gets the whole batch. Tensors may sit in lists, tuples and dicts; the first tensor's first dimension counts
the samples, and a dict's ``attention_mask`` (else ``input_ids``) the tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from emakit.engine.naming import unwrap_model

__all__ = [
    "LossFn",
    "batch_size",
    "batch_tokens",
    "first_samples",
    "forward_and_loss",
    "loss_of_first",
    "split_pair",
    "to_device",
]

LossFn = Callable[[Any, Any], torch.Tensor]


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (in lists, tuples, dicts) moved to ``device``; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batch_size(batch: Any) -> int:
    """The number of samples in ``batch``: the first dimension of its first tensor (1 without one)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size(next(iter(batch.values())))
    return 1


def batch_tokens(batch: Any) -> int:
    """The tokens in ``batch``: the sum of its ``attention_mask`` (padding left out) or the size of its
    ``input_ids``, for a dict batch (Hugging Face's, ``BatchEncoding`` too); 0 when it has neither (then a count
    in tokens needs one)."""
    if isinstance(batch, Mapping):
        mask, ids = batch.get("attention_mask"), batch.get("input_ids")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum().item())
        if isinstance(ids, torch.Tensor):
            return ids.numel()
    return 0


def split_pair(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch that is a pair; TypeError for anything else."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        "batches must be (inputs, targets) pairs unless the model defines loss(outputs, batch); "
        f"got a {type(batch).__name__}"
    )


def forward_and_loss(model: nn.Module, batch: Any, loss_fn: LossFn) -> tuple[Any, torch.Tensor, Any]:
    """Return (outputs, loss, targets or None). Uses ``model.loss(outputs, batch)`` when the model has one."""
    model_loss = getattr(unwrap_model(model), "loss", None)
    if callable(model_loss):
        outputs = model(batch)
        targets = batch[1] if isinstance(batch, (list, tuple)) and len(batch) == 2 else None
        return outputs, model_loss(outputs, batch), targets
    inputs, targets = split_pair(batch)
    outputs = model(inputs)
    return outputs, loss_fn(outputs, targets), targets


def first_samples(batch: Any, k: int) -> Any:
    """The first ``k`` samples of ``batch`` (of every tensor in it)."""
    if isinstance(batch, torch.Tensor):
        return batch[:k] if batch.dim() > 0 else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(first_samples(b, k) for b in batch)
    if isinstance(batch, dict):
        return {key: first_samples(v, k) for key, v in batch.items()}
    return batch


def loss_of_first(model: nn.Module, batch: Any, outputs: Any, k: int, loss_fn: LossFn) -> tuple[Any, torch.Tensor, Any]:
    """(outputs, loss, targets) of the first ``k`` samples of a batch whose forward has run on all of it."""
    part, head = first_samples(batch, k), first_samples(outputs, k)
    model_loss = getattr(unwrap_model(model), "loss", None)
    if callable(model_loss):
        targets = part[1] if isinstance(part, (list, tuple)) and len(part) == 2 else None
        return head, model_loss(head, part), targets
    _, targets = split_pair(part)
    return head, loss_fn(head, targets), targets
