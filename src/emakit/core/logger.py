"""Logger: fans metrics out to destinations (in memory by default; anything with ``log_metrics``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

__all__ = ["InMemoryLogger", "Logger", "LoggerDestination"]


@runtime_checkable
class LoggerDestination(Protocol):
    """Anything that accepts metrics: a file writer, an experiment tracker, a test probe."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class InMemoryLogger:
    """Keeps every logged record as ``{"step": step, **metrics}`` and the latest value of each metric."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self.latest: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.history.append({"step": step, **metrics})
        self.latest.update(metrics)


class Logger:
    """What algorithms and callbacks log through; forwards to each destination."""

    def __init__(self, destinations: Iterable[LoggerDestination] = ()) -> None:
        self.destinations = list(destinations)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for destination in self.destinations:
            destination.log_metrics(metrics, step)
