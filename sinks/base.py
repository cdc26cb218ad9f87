"""The sink contract: every destination Leadpipe delivers to implements this one class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from marshmallow import Schema

from workers.events import Event


class SinkError(Exception):
    """A delivery failed; the subclass says whether trying again can help."""


class RetryableSinkError(SinkError):
    """The destination is unavailable or overloaded: try again later."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class PermanentSinkError(SinkError):
    """The destination refused the event for good: retrying would fail the same way."""


class Sink(ABC):
    """A destination for events. Subclasses set `name` and `Options`, and implement `deliver`.

    A sink never swallows an error: it raises RetryableSinkError or PermanentSinkError.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Schema]]

    def __init__(self, options: dict[str, Any]):
        self.options = options

    @abstractmethod
    def deliver(self, events: Sequence[Event]) -> None:
        """Deliver a batch of events; idempotent, since a batch may be delivered again."""

    def close(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Release connections; the default has none."""
