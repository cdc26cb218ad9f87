"""The normalised event and the quarantined body: what parsing hands to the sinks."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

MARKETING_TYPES = ("WEBHOOK.CONVERTED", "WEBHOOK.MARKED_OPPORTUNITY")
# the RD Station CRM entities whose events RD sends (crm_<entity>_<action>)
CRM_ENTITIES = ("campaign", "contact", "deal", "lost_reason", "organization", "product",
                "source", "task")
CRM_ACTIONS = ("created", "updated", "deleted")
# every event type RD sends: a bounded set (routing checks names against it, metrics label by it)
EVENT_TYPES = frozenset({*MARKETING_TYPES, *(f"crm_{entity}_{action}" for entity in CRM_ENTITIES
                                             for action in CRM_ACTIONS)})


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
