"""Callback: code that observes the training loop (saving, logging, progress) after algorithms run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emakit.core.event import Event
    from emakit.core.logger import Logger
    from emakit.core.state import State

__all__ = ["Callback"]


class Callback:
    """Base class for callbacks. ``run_event`` dispatches to a method named after the event, if defined.

    For example, ``def batch_end(self, state, logger)`` runs at :attr:`Event.BATCH_END`.
    """

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        """Call ``self.<event.value>(state, logger)`` when that method exists."""
        handler = getattr(self, event.value, None)
        if handler is not None:
            handler(state, logger)

    def state_dict(self) -> dict[str, Any]:
        """State needed to resume exactly; plain data and tensors only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    @property
    def name(self) -> str:
        """Key of this callback's state in checkpoints."""
        return type(self).__name__
