"""The training loop's vocabulary: events, state, algorithms, callbacks and the engine that runs them."""

from emakit.core.algorithm import Algorithm
from emakit.core.callback import Callback
from emakit.core.engine import Engine
from emakit.core.event import Event
from emakit.core.logger import InMemoryLogger, Logger, LoggerDestination
from emakit.core.state import State

__all__ = ["Algorithm", "Callback", "Engine", "Event", "InMemoryLogger", "Logger", "LoggerDestination", "State"]
