"""Flat storage for a set of named tensors: one contiguous buffer per (device, dtype).

The EMA algorithm keeps its averages here. Each named tensor is a view into its group's buffer, so the
whole EMA can be saved, loaded, copied or blended group by group, and a model whose own tensors share
the same layout can be blended with one kernel per group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from emakit.functional import copy_tensors_, is_averaged, lerp_tensors_

__all__ = ["FlatStorage", "check_state_matches", "storage_dtype"]

_ALIGN_BYTES = 64


def storage_dtype(dtype: torch.dtype, fp32_ema: bool) -> torch.dtype:
    """The dtype an average of a ``dtype`` tensor is kept in: fp32 for 16-bit floats if ``fp32_ema``."""
    if fp32_ema and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def check_state_matches(state: Mapping[str, object], reference: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ValueError naming the first tensor of ``state`` whose name, shape or kind differs from ``reference``.

    Kinds are floating (averaged) and integer/bool (copied); a float32 state may load into a bfloat16
    reference and the other way round.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} must be a dict of tensors, got {type(state).__name__}")
    for name in reference:
        if name not in state:
            raise ValueError(f"{what} has no tensor {name!r}, which the model has")
    for name, value in state.items():
        if name not in reference:
            raise ValueError(f"{what} has a tensor {name!r} that the model does not have")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{what}: {name!r} is a {type(value).__name__}, expected a tensor")
        mine = reference[name]
        if value.shape != mine.shape:
            raise ValueError(
                f"{what}: tensor {name!r} has shape {tuple(value.shape)}, the model's has {tuple(mine.shape)}"
            )
        if is_averaged(value) != is_averaged(mine):
            raise ValueError(f"{what}: tensor {name!r} is {value.dtype}, the model's is {mine.dtype}")


class FlatStorage:
    """Copies of named tensors, each a view into one flat buffer per (device, dtype).

    Args:
        sources: the tensors to copy, by name; the order is kept.
        fp32_ema: keep fp16/bf16 floating tensors in fp32.
    """

    def __init__(self, sources: Mapping[str, torch.Tensor], *, fp32_ema: bool = True) -> None:
        self.names: list[str] = list(sources)
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        layout: dict[tuple[torch.device, torch.dtype], list[tuple[str, int, torch.Size]]] = {}
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        for name, src in sources.items():
            dtype = storage_dtype(src.dtype, fp32_ema) if is_averaged(src) else src.dtype
            key = (src.device, dtype)
            align = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
            offset = -(-sizes.get(key, 0) // align) * align
            layout.setdefault(key, []).append((name, offset, src.shape))
            sizes[key] = offset + src.numel()
        self.tensors: dict[str, torch.Tensor] = {}
        for key, entries in layout.items():
            device, dtype = key
            buffer = torch.zeros(sizes[key], dtype=dtype, device=device)
            self.buffers[key] = buffer
            for name, offset, shape in entries:
                self.tensors[name] = buffer[offset : offset + shape.numel()].view(shape)
        self.averaged: list[str] = [n for n in self.names if is_averaged(self.tensors[n])]
        self.copied: list[str] = [n for n in self.names if not is_averaged(self.tensors[n])]
        self._averaged_views = [self.tensors[n] for n in self.averaged]
        self._copied_views = [self.tensors[n] for n in self.copied]
        self._averaged_index = [self.names.index(n) for n in self.averaged]
        self._copied_index = [self.names.index(n) for n in self.copied]
        self.copy_from([sources[n] for n in self.names])

    @property
    def nbytes(self) -> int:
        """Bytes held by the flat buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def views(self) -> list[torch.Tensor]:
        """The stored tensors in ``names`` order."""
        return [self.tensors[n] for n in self.names]

    @torch.no_grad()
    def blend(self, sources: Sequence[torch.Tensor], weight: float) -> None:
        """``stored <- stored + weight * (source - stored)`` for floating tensors; copy the others.

        ``sources`` are in ``names`` order.
        """
        lerp_tensors_(self._averaged_views, [sources[i] for i in self._averaged_index], weight)
        copy_tensors_(self._copied_views, [sources[i] for i in self._copied_index])

    @torch.no_grad()
    def copy_from(self, sources: Sequence[torch.Tensor]) -> None:
        """Overwrite the stored tensors with ``sources`` (in ``names`` order)."""
        copy_tensors_(self.views(), sources)

    @torch.no_grad()
    def copy_to(self, targets: Sequence[torch.Tensor]) -> None:
        """Write the stored tensors into ``targets`` (in ``names`` order), casting as needed."""
        copy_tensors_(targets, self.views())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (views; clone them to keep a snapshot)."""
        return dict(self.tensors)

    def load_state_dict(self, state: Mapping[str, torch.Tensor], what: str = "EMA state") -> None:
        """Copy ``state`` into the storage after checking names, shapes and kinds of dtype."""
        check_state_matches(state, self.tensors, what)
        self.copy_from([state[n] for n in self.names])
