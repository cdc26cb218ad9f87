"""The read-only view of an event that routing conditions and sink field mappings address."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from workers.events import Event

MISSING = object()


def identifier(event: Event) -> str | None:
    """The conversion identifier RD subscriptions filter on (`event_identifiers`)."""
    if event.lead is not None:
        return event.lead.get("last_conversion_identifier") or (
            event.data.get("event_identifier") if event.source == "MKT" else None)
    return None


def view(event: Event) -> dict[str, Any]:
    """Names a routing file or a field mapping may use:

    event.{id,type,source,entity_type,entity_id,identifier,occurred_at,received_at,dedup_key},
    lead.<column of the leads table>, funnel.{opportunity,lifecycle_stage,fit,interest,
    contact_owner_email}, deal.<column of the deals table>, contact.<field as RD sent it>
    (v2 contact or legacy lead), document.<field as RD sent it> (CRM).
    """
    lead = event.lead or {}
    contact: dict[str, Any] = {}
    if isinstance(event.data.get("contact"), dict):
        contact = event.data["contact"]
    elif isinstance(event.data.get("leads"), list) and event.data["leads"]:
        first = event.data["leads"][0]
        contact = first if isinstance(first, dict) else {}
    return {
        "event": {
            "id": event.id, "type": event.event_type, "source": event.source,
            "entity_type": event.entity_type, "entity_id": event.entity_id,
            "identifier": identifier(event), "occurred_at": event.occurred_at,
            "received_at": event.received_at, "dedup_key": event.dedup_key,
        },
        "lead": lead,
        "funnel": {
            "opportunity": lead.get("opportunity"), "lifecycle_stage": lead.get("lifecycle_stage"),
            "fit": lead.get("fit"), "interest": lead.get("interest"),
            "contact_owner_email": lead.get("owner_email"),
        } if event.lead is not None else {},
        "deal": event.deal or {},
        "contact": contact,
        "document": event.data.get("document") if isinstance(event.data.get("document"),
                                                               dict) else {},
    }


def lookup(data: dict[str, Any], path: str) -> Any:
    """Follow a dotted path; MISSING when any step is absent."""
    value: Any = data
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return MISSING
    return value


def jsonable(value: Any) -> Any:
    """Datetimes as ISO-8601 and Decimals as strings, for JSON bodies sent to sinks."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
