"""Algorithm: a change to training that the Trainer runs at events."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from emakit.core.event import Event
    from emakit.core.logger import Logger
    from emakit.core.state import State

__all__ = ["Algorithm"]


class Algorithm:
    """Base class for algorithms. Algorithms run before callbacks at every event.

    Subclasses override :meth:`match` (pure: may not change state) and :meth:`apply`. Algorithms that
    keep state for resumption override :meth:`state_dict` and :meth:`load_state_dict`.
    """

    #: True for algorithms that replace the model's weights with an average (EMA, SWA). The Trainer warns
    #: when two are combined: model-averaging methods do not compose well.
    averages_model: ClassVar[bool] = False

    def match(self, event: Event, state: State) -> bool:
        """Whether :meth:`apply` should run at ``event``."""
        return True

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Run the algorithm at ``event``."""

    def state_dict(self) -> dict[str, Any]:
        """State needed to resume exactly; plain data and tensors only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def checkpoint_model_state(
        self, model_state: dict[str, Any], algorithm_state: dict[str, Any], publish: bool
    ) -> dict[str, Any]:
        """Return the model weights a checkpoint should carry, given the model's current state_dict.

        With ``publish`` false the result must be the training weights; with ``publish`` true an algorithm may
        put other weights there (the EMA's), moving what it replaced into ``algorithm_state["training_weights"]``
        so that :meth:`restore_model_state` can undo it (and a run without the algorithm finds them there). The
        default returns ``model_state`` unchanged.
        """
        return model_state

    def restore_model_state(self, model_state: dict[str, Any], algorithm_state: dict[str, Any]) -> dict[str, Any]:
        """Inverse of :meth:`checkpoint_model_state`: the training weights from a checkpoint's model state."""
        return model_state

    @property
    def name(self) -> str:
        """Key of this algorithm's state in checkpoints."""
        return type(self).__name__
