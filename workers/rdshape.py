"""RD Station's own body for an event, as an RD subscriber with given relations would receive it."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection
from datetime import datetime
from typing import Any

from workers.events import Event

COMPANY = "COMPANY"
CONTACT_FUNNEL = "CONTACT_FUNNEL"

# The contact fields of RD's v2 body, in RD's order (spec section 2.A).
V2_CONTACT_FIELDS = ("uuid", "email", "name", "job_title", "bio", "website", "personal_phone",
                     "mobile_phone", "city", "state", "facebook", "linkedin", "twitter")


def rd_time(moment: datetime) -> str:
    """ISO-8601 with milliseconds and offset, as RD writes times."""
    return moment.isoformat(timespec="milliseconds")


def rd_body(event: Event, relations: Collection[str] = ()) -> dict[str, Any]:
    """The body RD would POST to a subscription of `event`'s type with `include_relations`.

    - Marketing v2 events: the body as RD sent it; `contact.company` / `contact.funnel` kept only
      when the relation is asked for, and filled from the lead when asked for but absent.
    - Legacy leads: converted into the v2 shape (see `legacy_contact`).
    - CRM events: RD's CRM envelope as received (`event_name`, `document`, ...), which has no
      relations.
    """
    if event.source == "CRM":
        return event.data
    relations = frozenset(relations)
    if isinstance(event.data.get("contact"), dict):
        body = dict(event.data)
        contact = dict(body["contact"])
        body["contact"] = contact
    else:
        body = {
            "event_type": event.event_type,
            "entity_type": "CONTACT",
            "event_identifier": _identifier(event),
            "timestamp": rd_time(event.received_at),
            "event_timestamp": rd_time(_moment(event)),
        }
        contact = legacy_contact(event)
        body["contact"] = contact
    lead = event.lead or {}
    if COMPANY in relations:
        if not isinstance(contact.get("company"), dict):
            contact["company"] = {"name": lead.get("company")}
    else:
        contact.pop("company", None)
    if CONTACT_FUNNEL in relations:
        if not isinstance(contact.get("funnel"), dict):
            contact["funnel"] = _funnel(event)
    else:
        contact.pop("funnel", None)
    return body


def _moment(event: Event) -> datetime:
    """When the event happened: a conversion's own time (a legacy lead's newest moment may be
    a later opportunity mark)."""
    converted = (event.lead or {}).get("last_conversion_at")
    if event.event_type == "WEBHOOK.CONVERTED" and isinstance(converted, datetime):
        return converted
    return event.occurred_at


def _identifier(event: Event) -> str | None:
    if event.event_type == "WEBHOOK.MARKED_OPPORTUNITY":
        return "default"  # what RD sends for this event
    return (event.lead or {}).get("last_conversion_identifier")


def legacy_contact(event: Event) -> dict[str, Any]:
    """A legacy lead as a v2 `contact`: the v2 fields by name (null when the lead lacks one),
    `tags` a list, `legal_bases` empty (legacy bodies carry none), and each custom field
    `label: value` as `cf_<label in snake case>` (RD's v2 names custom fields by their API id,
    which a legacy body does not carry), left out when empty as RD does."""
    raw = _raw_lead(event)
    contact: dict[str, Any] = {name: raw.get(name) for name in V2_CONTACT_FIELDS}
    tags = raw.get("tags")
    contact["tags"] = tags if isinstance(tags, list) else []
    contact["legal_bases"] = []
    custom = raw.get("custom_fields")
    if isinstance(custom, dict):
        for label, value in custom.items():
            if value not in (None, "", []):
                contact[f"cf_{snake(str(label))}"] = value
    return contact


def _raw_lead(event: Event) -> dict[str, Any]:
    leads = event.data.get("leads")
    if isinstance(leads, list) and leads and isinstance(leads[0], dict):
        return leads[0]
    return {}


def _funnel(event: Event) -> dict[str, Any]:
    """The CONTACT_FUNNEL relation from what Leadpipe knows of the lead.

    `fit` is RD's v2 integer; a legacy `fit_score` letter has no documented integer, so it is
    null. `origin` is "channel | source" of the lead's first conversion, RD's own format for it.
    """
    lead = event.lead or {}
    fit = lead.get("fit")
    origin = None
    first = _raw_lead(event).get("first_conversion")
    if isinstance(first, dict) and isinstance(first.get("conversion_origin"), dict):
        source = first["conversion_origin"]
        origin = " | ".join(str(p) for p in (source.get("channel"), source.get("source")) if p)
    return {
        "name": "default",
        "lifecycle_stage": lead.get("lifecycle_stage"),
        "opportunity": _opportunity(event),
        "contact_owner_email": lead.get("owner_email"),
        "interest": lead.get("interest"),
        # ASCII digits only: "²".isdigit() holds, and int() refuses it
        "fit": int(fit) if isinstance(fit, str) and fit.isascii() and fit.isdigit() else None,
        "origin": origin or None,
    }


def _opportunity(event: Event) -> bool | None:
    """The lead's opportunity flag; None when the event does not say (not False: a lead that
    is one must not be reported as not one), True for an opportunity mark."""
    value = (event.lead or {}).get("opportunity")
    if value is None and event.event_type == "WEBHOOK.MARKED_OPPORTUNITY":
        return True
    return value if isinstance(value, bool) else None


def snake(label: str) -> str:
    """"Qual o seu segmento?" -> "qual_o_seu_segmento": ASCII, lower case, underscores."""
    ascii_text = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_") or "field"
