"""The EMA's inner parts under the private names they had before the EMA was split into parts.

The Trainer adapter (:mod:`emakit.algorithms.ema`), integrations and tests reach a few of them (the
evaluated storage, the overlap, whether the model is sharded...). :class:`FormerNames`, a base of
:class:`~emakit.averaging.EMA`, keeps them working as views of the parts, out of the EMA's own reading.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from emakit.averaging import states
from emakit.averaging.averages import Averages
from emakit.averaging.swap import Swap
from emakit.averaging.tracked import TrackedModel
from emakit.engine.blend import PreparedBlend
from emakit.engine.overlap import Overlap
from emakit.engine.plan import UpdatePlan
from emakit.engine.storage import FlatStorage

__all__ = ["FormerNames"]


class FormerNames:
    """``_storage``, ``_overlap``, ``_prepared``, ``_sharded``, ``_swapped``, ``_is_own``, ``_model_tensors``
    and ``_keys_of_tracked``, read from the parts the EMA holds."""

    _averages: Averages
    _tracked: TrackedModel
    _swap: Swap
    eval_average: int

    @property
    def _storage(self) -> FlatStorage | None:
        """The evaluated average's storage (None before the start)."""
        storages = self._averages.storages
        return None if storages is None else storages[self.eval_average]

    @property
    def _overlap(self) -> Overlap | None:
        return self._averages.overlap

    @_overlap.setter
    def _overlap(self, overlap: Overlap | None) -> None:
        self._averages.overlap = overlap

    @property
    def _prepared(self) -> tuple[UpdatePlan, PreparedBlend] | None:
        return self._averages.prepared

    @property
    def _sharded(self) -> bool:
        return self._tracked.sharded

    @property
    def _swapped(self) -> nn.Module | None:
        return self._swap.swapped

    def _is_own(self, model: nn.Module) -> bool:
        return self._tracked.is_own(model)

    def _model_tensors(self, model: nn.Module | None = None) -> list[torch.Tensor]:
        return self._tracked.model_tensors(model)

    def _keys_of_tracked(self, model_state: Mapping[str, Any]) -> list[tuple[str, str]]:
        return states.keys_of_tracked(self._tracked, model_state)
