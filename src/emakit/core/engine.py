"""Engine: runs the algorithms, then the callbacks, at an event."""

from __future__ import annotations

from emakit.core.event import Event
from emakit.core.logger import Logger
from emakit.core.state import State

__all__ = ["Engine"]


class Engine:
    """Runs ``state.algorithms`` (those whose ``match`` is true), then ``state.callbacks``, in list order."""

    def __init__(self, state: State, logger: Logger) -> None:
        self.state = state
        self.logger = logger

    def run_event(self, event: Event) -> None:
        for algorithm in self.state.algorithms:
            if algorithm.match(event, self.state):
                algorithm.apply(event, self.state, self.logger)
        for callback in self.state.callbacks:
            callback.run_event(event, self.state, self.logger)
