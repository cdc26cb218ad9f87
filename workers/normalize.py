"""Raw stream entries to normalised events: dialect detection, validation, dedup keys, state."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Any

import orjson
from marshmallow import ValidationError

from ingest.queue import Entry
from workers.events import EVENT_TYPES, MARKETING_TYPES, Event, Rejected
from workers.schemas import (
    DEAL_EVENTS,
    CrmEnvelopeSchema,
    DealSchema,
    LegacyLeadSchema,
    MarketingV2Schema,
)
from workers.schemas import normal_email as _email

_V2 = MarketingV2Schema()
_LEGACY = LegacyLeadSchema()
_CRM = CrmEnvelopeSchema()
_DEAL = DealSchema()


# 19 digits or more in a row: an integer that may lie outside orjson's 64-bit range
# (-2^63 .. 2^64-1), which it would read as a rounded float. A long digit string inside a text
# matches too, and only costs the slower parser. Found by mapping every digit to 0 and anything
# else to a space, then one substring search: a regex scan cost 16 µs a body, this 1.
_DIGITS_ONLY = bytes(ord("0") if chr(i).isdigit() and i < 128 else ord(" ") for i in range(256))
_LONG_RUN = b"0" * 19


def parse_body(body: bytes) -> Any:
    """JSON text to Python that Postgres' jsonb accepts: integers past 64 bits kept, NUL
    characters dropped, lone surrogates (a name cut in the middle of an emoji) as U+FFFD."""
    odd = _LONG_RUN in body.translate(_DIGITS_ONLY)  # orjson reads those as rounded floats
    if not odd:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:  # a lone surrogate, escaped or as raw bytes
            odd = True
    if odd:
        data = json.loads(body)
    if odd or b"\\u0000" in body:
        data = _repair(data)
    return data


def dump(data: Any) -> str:
    """Python to JSON text that Postgres' jsonb accepts."""
    try:
        return orjson.dumps(data).decode()
    except TypeError:  # integers past 64 bits, or lone surrogates
        return json.dumps(data, ensure_ascii=True)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a valid pair is one character once parsed


def _repair(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value.replace("\x00", ""))
    if isinstance(value, list):
        return [_repair(v) for v in value]
    if isinstance(value, dict):
        return {_repair(k): _repair(v) for k, v in value.items()}
    return value


def canonical_hash(data: Any) -> str:
    try:
        text = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        text = json.dumps(data, sort_keys=True, ensure_ascii=True).encode()
    return hashlib.sha256(text).hexdigest()


def _raw(value: Any) -> str:
    return value if isinstance(value, str) else dump(value)


def as_json_string(body: bytes) -> str:
    """Any bytes as a JSON string Postgres' jsonb accepts: invalid UTF-8 as \\xNN text, NUL
    characters as the six characters \\u0000 (jsonb refuses the escape), nothing lost."""
    text = body.decode("utf-8", "backslashreplace").replace("\x00", "\\u0000")
    return json.dumps(text)


def quarantine(entry: Entry, received: datetime, reason: Any, payload: str | None = None,
                suffix: str = "") -> Rejected:
    if payload is None:
        try:
            payload = dump(parse_body(entry.body))
        except Exception:  # not storable as JSON: keep the bytes as a JSON string
            payload = as_json_string(entry.body)
    text = reason if isinstance(reason, str) else dump(reason)
    return Rejected(entry.event_id + suffix, received, text, payload, entry.hint)


def normalize(entry: Entry) -> list[Event | Rejected]:
    """Every event one stream entry holds (a legacy body may hold several), or its rejection."""
    received = datetime.fromtimestamp(entry.received_ms / 1000, UTC)
    try:
        data = parse_body(entry.body)
    except (ValueError, RecursionError) as exc:
        return [quarantine(entry, received, f"not JSON: {exc}")]
    try:
        if not isinstance(data, dict):
            return [quarantine(entry, received, "body is not a JSON object")]
        if "leads" in data:
            return _legacy(entry, received, data)
        if "event_name" in data:
            return [_crm(entry, received, data)]
        if "event_type" in data:
            return [_v2(entry, received, data)]
        return [quarantine(entry, received,
                            "unknown shape: expected event_type, event_name or leads")]
    except ValidationError as exc:
        return [quarantine(entry, received, exc.messages)]
    except RecursionError:
        return [quarantine(entry, received, "body nested too deeply")]


_CRM_NAME = re.compile(r"crm_([a-z]{1,40}|lost_reason)_(created|updated|deleted)")


def claimed_type(payload: str, hint: str | None = None) -> str:
    """The event type a quarantined body claims, when it is one RD sends, else "unknown": a
    bounded set, fit for a metric label (a junk body cannot invent new ones)."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return "unknown"
    if not isinstance(data, dict):
        return "unknown"
    if "leads" in data:
        return hint if hint in MARKETING_TYPES else "WEBHOOK.CONVERTED"
    claimed = data.get("event_type", data.get("event_name"))
    return claimed if isinstance(claimed, str) and claimed in EVENT_TYPES else "unknown"


def _payload(entry: Entry, data: dict) -> str:
    # the body as received is the exact record; re-serialise only what was cleaned of NULs or
    # lone surrogates, or starts with a byte order mark (jsonb refuses all three)
    body = entry.body
    if b"\\u0000" in body or body.startswith(b"\xef\xbb\xbf") or _has_lone_surrogate(body):
        return dump(data)
    try:
        return body.decode()
    except UnicodeDecodeError:  # a surrogate sent as raw bytes (CESU-8): repaired as the rest
        return dump(data)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(body: bytes) -> bool:
    if _SURROGATE_ESCAPE.search(body) is None:  # escaped surrogates are rare: mostly one scan
        return False
    try:
        body.decode("utf-8")  # invalid UTF-8 (raw surrogate bytes too) is another matter
    except UnicodeDecodeError:
        return False
    try:
        orjson.loads(body)  # it refuses a lone one, takes a pair
    except orjson.JSONDecodeError:
        return True
    return False


def _v2(entry: Entry, received: datetime, data: dict) -> Event:
    msg = _V2.load(data)
    contact = msg["contact"]
    event_type = msg["event_type"]
    occurred = msg["event_timestamp"] or msg["timestamp"] or received
    ident = contact.get("uuid") or (contact.get("email") or "").lower()
    raw_ts = data.get("event_timestamp")
    if raw_ts:
        key = f"mkt:{event_type}:{ident}:{_raw(data.get('event_identifier'))}:{_raw(raw_ts)}"
    else:  # without `timestamp`: the time RD sent it, new on each of its retries
        key = "mkt:hash:" + canonical_hash({k: v for k, v in data.items() if k != "timestamp"})
    funnel = contact.get("funnel") or {}
    company = contact.get("company") or {}
    converted = event_type == "WEBHOOK.CONVERTED"
    opportunity = True if event_type == "WEBHOOK.MARKED_OPPORTUNITY" else funnel.get("opportunity")
    lead = {
        "uuid": contact.get("uuid"),
        "legacy_id": None,
        "email": _email(contact.get("email")),
        "name": contact.get("name"),
        "company": company.get("name"),
        "job_title": contact.get("job_title"),
        "mobile_phone": contact.get("mobile_phone"),
        "personal_phone": contact.get("personal_phone"),
        "city": contact.get("city"),
        "state": contact.get("state"),
        "website": contact.get("website"),
        "tags": contact.get("tags") if "tags" in data["contact"] else None,
        "lifecycle_stage": funnel.get("lifecycle_stage"),
        "opportunity": opportunity,
        "fit": _text(funnel.get("fit")),
        "interest": funnel.get("interest"),
        "owner_email": _email(funnel.get("contact_owner_email")),
        "number_conversions": None,
        "last_conversion_identifier": msg["event_identifier"] if converted else None,
        "last_conversion_at": occurred if converted else None,
        "custom_fields": {k[3:]: v for k, v in data["contact"].items() if k.startswith("cf_")}
        or None,
        "updated_at": occurred,
    }
    return Event(entry.event_id, key, "MKT", event_type, "CONTACT", ident or None, occurred,
                 received, _payload(entry, data), lead=lead, data=data)


def _legacy(entry: Entry, received: datetime, data: dict) -> list[Event | Rejected]:
    leads = data["leads"]
    if not isinstance(leads, list) or not leads:
        return [quarantine(entry, received, {"leads": ["Must be a non-empty list of leads."]})]
    event_type = entry.hint or "WEBHOOK.CONVERTED"
    single = len(leads) == 1
    out: list[Event | Rejected] = []
    for n, raw in enumerate(leads):
        suffix = "" if n == 0 else f"-{n}"
        payload = _payload(entry, data) if single else dump({"leads": [raw]})
        if not isinstance(raw, dict):
            out.append(quarantine(entry, received, {"leads": {str(n): ["Not an object."]}},
                                   payload, suffix))
            continue
        try:
            lead = _LEGACY.load(raw)
        except ValidationError as exc:
            out.append(quarantine(entry, received, {"leads": {str(n): exc.messages}}, payload,
                                   suffix))
            continue
        out.append(_legacy_event(entry, received, event_type, raw, lead, payload, suffix))
    return out


def legacy_key_before(key: str) -> str | None:
    """The key versions before the lead's hash joined it gave this legacy event, if any (a
    body stored by one of them and delivered again now is still the same event)."""
    if key.startswith("legacy:") and not key.startswith("legacy:hash:"):
        before, _, tail = key.rpartition(":")
        if len(tail) == LEAD_HASH_DIGITS:
            return before
    return None


LEAD_HASH_DIGITS = 16


def lead_hash(raw: Any) -> str:
    """The part of a legacy key that tells two sendings of one lead apart."""
    return canonical_hash(raw)[:LEAD_HASH_DIGITS]


def _legacy_event(entry: Entry, received: datetime, event_type: str, raw: dict, lead: dict,
                  payload: str, suffix: str) -> Event:
    last = lead.get("last_conversion") or {}
    first = lead.get("first_conversion") or {}
    moments = [t for t in (last.get("created_at"), lead.get("last_marked_opportunity_date")) if t]
    occurred = max(moments) if moments else received
    ident = lead.get("uuid") or lead.get("id") or (lead.get("email") or "").lower()
    raw_last = raw.get("last_conversion") if isinstance(raw.get("last_conversion"), dict) else {}
    if ident and raw_last.get("created_at"):
        # and the lead's own hash: RD's "send leads to integration" automation sends a lead
        # again with no new conversion, and its changed stage, owner or tags are news (a retry
        # of one delivery sends the same lead, which carries no send time)
        key = (f"legacy:{event_type}:{ident}:{_raw(raw_last['created_at'])}:"
               f"{lead.get('opportunity')}:{lead_hash(raw)}")
    else:
        key = "legacy:hash:" + canonical_hash({"type": event_type, "lead": raw})
    content = last.get("content") or {}
    identifier = (content.get("conversion_identifier") or content.get("identificador")
                  or last.get("source"))
    if identifier is not None and not isinstance(identifier, str):
        identifier = dump(identifier)
    state = {
        "uuid": lead.get("uuid"),
        "legacy_id": lead.get("id"),
        "email": _email(lead.get("email")),
        "name": lead.get("name"),
        "company": lead.get("company"),
        "job_title": lead.get("job_title"),
        "mobile_phone": lead.get("mobile_phone"),
        "personal_phone": lead.get("personal_phone"),
        "city": lead.get("city"),
        "state": lead.get("state"),
        "website": lead.get("website"),
        # null is no tags; a lead sent without the key says nothing of them (kept as stored)
        "tags": (lead.get("tags") or []) if "tags" in raw else None,
        "lifecycle_stage": lead.get("lead_stage"),
        "opportunity": True if event_type == "WEBHOOK.MARKED_OPPORTUNITY"
        else lead.get("opportunity"),
        "fit": lead.get("fit_score"),
        "interest": lead.get("interest"),
        "owner_email": _email(lead.get("user")),
        "number_conversions": lead.get("number_conversions"),
        "last_conversion_identifier": identifier,
        "last_conversion_at": last.get("created_at") or first.get("created_at"),
        "custom_fields": lead.get("custom_fields") or None,
        "updated_at": occurred,
    }
    return Event(entry.event_id + suffix, key, "MKT", event_type, "CONTACT", ident or None,
                 occurred, received, payload, lead=state, data={"leads": [raw]})


def _crm(entry: Entry, received: datetime, data: dict) -> Event | Rejected:
    msg = _CRM.load(data)
    name = msg["event_name"]
    known = _CRM_NAME.fullmatch(name)
    if known is None:
        return quarantine(entry, received,
                           {"event_name": [f"Unknown CRM event {name[:80]!r}."]})
    doc = msg["document"]
    tx = data.get("transaction_uuid")
    key = f"crm:{_raw(tx)}" if tx else "crm:hash:" + canonical_hash(data)
    entity_id = doc.get("id")
    entity_id = None if entity_id is None else _raw(entity_id)
    deal = None
    occurred = msg["event_timestamp"]
    if name in DEAL_EVENTS:
        d = _DEAL.load(doc)
        if occurred is None and d["updated_at"] is not None:
            # RD's event_timestamp is whole seconds and the document's time orders within
            # one (DEAL_ORDER): the fallback is cut to its second, to rank as the others do
            occurred = d["updated_at"].replace(microsecond=0)
        occurred = occurred or received
        deal = _deal_state(d, name, occurred)
    occurred = occurred or received
    return Event(entry.event_id, key, "CRM", name, known[1].upper(), entity_id, occurred,
                 received, _payload(entry, data), deal=deal, data=data)


def _deal_state(d: dict, name: str, occurred: datetime) -> dict[str, Any]:
    custom: dict[str, Any] = {}
    for item in d.get("deal_custom_fields") or []:
        cf = item.get("custom_field") or {}
        label = cf.get("label") or cf.get("id")
        if label is not None:
            custom[_raw(label)] = item.get("value")
    user = d.get("user") or {}
    return {
        "id": d["id"],
        "name": d.get("name"),
        "status": d.get("status"),
        "amount_monthly": d.get("amount_monthly"),
        "amount_unique": d.get("amount_unique"),
        "amount_total": d.get("amount_total"),
        "rating": d.get("rating"),
        "stage_name": _text((d.get("deal_stage") or {}).get("name")),
        "pipeline_name": _text((d.get("deal_pipeline") or {}).get("name")),
        "source_name": _text((d.get("deal_source") or {}).get("name")),
        "campaign_name": _text((d.get("campaign") or {}).get("name")),
        "owner_email": _email(_text(user.get("email"))),
        "custom_fields": custom or None,
        "prediction_date": d.get("prediction_date"),
        "created_at": d.get("created_at"),
        "closed_at": d.get("closed_at"),
        "deleted_at": occurred if name == "crm_deal_deleted" else None,
        "updated_at": occurred,
        # event_timestamp has whole seconds: this orders the deal's events of one second
        # (None, as in deletes, orders after them); see sinks.postgres.DEAL_ORDER
        "document_updated_at": d.get("updated_at"),
    }


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return dump(value)
