"""The normalised event and the quarantined body: what parsing hands to the sinks."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass
class Event:
    """One validated RD event with its dedup key and the lead or deal state it carries."""

    id: str
    dedup_key: str
    source: str  # "MKT" or "CRM"
    event_type: str
    entity_type: str
    entity_id: str | None
    occurred_at: datetime
    received_at: datetime
    payload: str  # the raw event, JSON text
    lead: dict[str, Any] | None = None
    deal: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict, repr=False)  # the parsed body, for routing
    # the only fields a latest-state sink may send of it, None for all: an event newer ones
    # overtook sends just what none of them carries (Sink.narrowed)
    only: frozenset[str] | None = None


@dataclass
class Rejected:
    """A body (or one lead of a legacy body) that could not be understood, and why."""

    id: str
    received_at: datetime
    reason: str
    payload: str  # JSON text: the body as received, or a JSON string when it was not storable
    hint: str | None = None  # the ?event_type= the body was posted with, needed to replay it
