"""What an averaging algorithm puts into emakit's checkpoints: the average as the model, the training weights beside.

EMA and SWA publish alike, so both Trainer adapters take these two methods from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PublishedCheckpoint"]


class PublishedCheckpoint:
    """Mixin over an averaging class (``started``, ``training_model_state``, ``published_model_state``)."""

    def checkpoint_model_state(
        self, model_state: dict[str, Any], algorithm_state: dict[str, Any], publish: bool
    ) -> dict[str, Any]:
        training = self.training_model_state(model_state)  # type: ignore[attr-defined]
        if not (publish and self.started):  # type: ignore[attr-defined]
            return training
        # tied weights' other names too, so that restoring gives them the training value as well
        tracked = self._keys_of_tracked(training)  # type: ignore[attr-defined]
        algorithm_state["training_weights"] = {key: training[key] for key, _ in tracked}
        return self.published_model_state(training)  # type: ignore[attr-defined]

    def restore_model_state(self, model_state: dict[str, Any], algorithm_state: dict[str, Any]) -> dict[str, Any]:
        training = algorithm_state.get("training_weights")
        if training is None:
            return model_state
        what = type(self).__name__
        if not isinstance(training, Mapping):
            raise ValueError(f"{what} state's 'training_weights' must be a dict of tensors")
        unknown = [n for n in training if n not in model_state]
        if unknown:
            raise ValueError(
                f"{what} state's training weights have a tensor {unknown[0]!r} the checkpoint's model lacks"
            )
        return {**model_state, **training}
