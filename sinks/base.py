"""The sink contract: every destination Leadpipe delivers to implements this one class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from marshmallow import Schema

from workers.events import Event


class SinkError(Exception):
    """A delivery failed; the subclass says whether trying again can help.

    `status` is the destination's answer (an HTTP status, an SMTP code) when there was one;
    it is recorded with the attempt.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RetryableSinkError(SinkError):
    """The destination is unavailable, slow or overloaded: try again later.

    `retry_after` (seconds) is the destination's own request (HTTP Retry-After), honoured as
    the least delay before the next attempt.
    """

    def __init__(self, message: str, status: int | None = None,
                 retry_after: float | None = None):
        super().__init__(message, status)
        self.retry_after = retry_after


class PermanentSinkError(SinkError):
    """The destination refused the event for good: retrying would fail the same way."""


class Sink(ABC):
    """A destination for events.

    Subclasses set `name` (the type name used in the routing file) and `Options` (a marshmallow
    schema for the instance's options), and implement `deliver`. `deliver` must be idempotent:
    after a crash the same event may be delivered again, so a sink passes the event's
    `dedup_key` on as an idempotency key wherever the destination accepts one. A sink never
    swallows an error: it raises RetryableSinkError or PermanentSinkError (anything else is
    treated as retryable).
    """

    name: ClassVar[str]
    Options: ClassVar[type[Schema]]
    # True for a sink that keeps an entity's current state (create-or-update by key, as the crm
    # sink does): an event whose lead or deal a newer event has changed since it was stored is
    # not sent, as it would put older values over newer ones; its delivery ends "superseded".
    # Sinks that tell of each event (e-mail, webhooks) leave it False and get every event.
    latest_state_only: ClassVar[bool] = False

    def __init__(self, instance: str, options: dict[str, Any]):
        self.instance = instance  # the name of this configured instance, e.g. "crm-sales"
        self.options = options  # already loaded (validated) by Options

    def narrowed(self, older: Event, newer: list[Event]) -> Event | None:
        """For a latest_state_only sink: what is still to send of `older`, which the `newer`
        events of its lead or deal (sent or to be sent here) have overtaken, or None when
        nothing is (the delivery then ends "superseded")."""
        return None

    @abstractmethod
    def deliver(self, event: Event) -> int | None:
        """Deliver one event, or raise RetryableSinkError / PermanentSinkError.

        Returns the destination's answer code when there is one (an HTTP status), for the
        attempt record."""

    def deliver_many(self, events: Sequence[Event]) -> list[BaseException | None]:
        """Deliver a batch; one outcome per event (None = delivered). Override where the
        destination takes batches (as Postgres does)."""
        outcomes: list[BaseException | None] = []
        for event in events:
            try:
                self.deliver(event)
                outcomes.append(None)
            except Exception as exc:  # recorded per event by the caller, never swallowed
                outcomes.append(exc)
        return outcomes

    def close(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Release connections; the default has none."""
