"""The crm sink: create-or-update each lead and deal in a CRM's REST API by Leadpipe's own key."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from marshmallow import RAISE, Schema, ValidationError, fields, post_load
from marshmallow.validate import Length

from sinks.base import PermanentSinkError, Sink
from sinks.http import (
    free_header,
    header_value,
    http_url,
    json_body,
    send,
    timeout_field,
)
from sinks.postgres import DEAL_COLUMNS, LEAD_COLUMNS
from sinks.transport import new_session
from workers.events import Event
from workers.view import MISSING, jsonable, lookup, view

# CRM field -> path into workers.view.view(event). Keys keep their order in the body.
DEFAULT_LEAD_MAPPING: dict[str, str] = {
    "uuid": "lead.uuid",
    "legacy_id": "lead.legacy_id",
    "email": "lead.email",
    "name": "lead.name",
    "company": "lead.company",
    "job_title": "lead.job_title",
    "mobile_phone": "lead.mobile_phone",
    "personal_phone": "lead.personal_phone",
    "city": "lead.city",
    "state": "lead.state",
    "website": "lead.website",
    "tags": "lead.tags",
    "stage": "funnel.lifecycle_stage",
    "opportunity": "funnel.opportunity",
    "fit": "funnel.fit",
    "interest": "funnel.interest",
    "owner_email": "funnel.contact_owner_email",
    "number_conversions": "lead.number_conversions",
    "last_conversion": "lead.last_conversion_identifier",
    "last_conversion_at": "lead.last_conversion_at",
    "custom_fields": "lead.custom_fields",
    "updated_at": "lead.updated_at",
}
DEFAULT_DEAL_MAPPING: dict[str, str] = {
    "id": "deal.id",
    "name": "deal.name",
    "status": "deal.status",
    "amount_monthly": "deal.amount_monthly",
    "amount_unique": "deal.amount_unique",
    "amount_total": "deal.amount_total",
    "rating": "deal.rating",
    "stage": "deal.stage_name",
    "pipeline": "deal.pipeline_name",
    "source": "deal.source_name",
    "campaign": "deal.campaign_name",
    "owner_email": "deal.owner_email",
    "custom_fields": "deal.custom_fields",
    "prediction_date": "deal.prediction_date",
    "created_at": "deal.created_at",
    "closed_at": "deal.closed_at",
    "deleted_at": "deal.deleted_at",
    "updated_at": "deal.updated_at",
}
DEFAULT_PATHS = {"lead": "/leads", "deal": "/deals"}

# Headers the sink sets itself; auth_header may not take their place.
_OWN_HEADERS = frozenset({"content-type", "content-length", "host", "idempotency-key",
                          "x-leadpipe-event-id", "transfer-encoding"})
_SAFE_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # fullmatch: "$" would let a last "\n" in


def _view_names() -> dict[str, frozenset[str] | None]:
    """What a mapping may address: a fixed set of names under event, funnel, lead and deal;
    anything under contact and document (fields as RD sent them)."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    sample = view(Event(id="", dedup_key="", source="MKT", event_type="", entity_type="CONTACT",
                        entity_id=None, occurred_at=epoch, received_at=epoch, payload="{}",
                        lead={}))
    names: dict[str, frozenset[str] | None] = {root: None for root in sample}
    names["event"] = frozenset(sample["event"])
    names["funnel"] = frozenset(sample["funnel"])
    names["lead"] = frozenset((*LEAD_COLUMNS, "updated_at"))
    names["deal"] = frozenset(("id", *DEAL_COLUMNS, "updated_at"))
    return names


VIEW_NAMES = _view_names()


def view_path(value: str) -> None:
    """Validator: a dotted path workers.view.view(event) can have, e.g. "lead.email"."""
    parts = value.split(".")
    if len(parts) < 2 or not all(parts):
        raise ValidationError(f"{value!r} is not a dotted path such as 'lead.email'.")
    if parts[0] not in VIEW_NAMES:
        raise ValidationError(f"{value!r} must start with one of: "
                              + ", ".join(sorted(VIEW_NAMES)) + ".")
    known = VIEW_NAMES[parts[0]]
    if known is not None and parts[1] not in known:
        raise ValidationError(f"{value!r}: {parts[0]} has no {parts[1]!r}; known: "
                              + ", ".join(sorted(known)) + ".")


def url_path(value: str) -> None:
    """Validator: an absolute URL path such as "/leads" or "/api/v1/contacts"."""
    if not value.startswith("/") or any(c in value for c in "?# \t\r\n"):
        raise ValidationError("Must start with '/' and have no query, fragment or spaces.")


def _mapping(default: dict[str, str]) -> fields.Dict:
    return fields.Dict(keys=fields.String(validate=Length(min=1)),
                       values=fields.String(validate=view_path),
                       load_default=lambda: dict(default), validate=Length(min=1))


class CrmPaths(Schema):
    """Where each kind of entity lives under base_url; null turns that kind off."""

    class Meta:
        unknown = RAISE

    lead = fields.String(load_default=DEFAULT_PATHS["lead"], allow_none=True, validate=url_path)
    deal = fields.String(load_default=DEFAULT_PATHS["deal"], allow_none=True, validate=url_path)


class CrmMappings(Schema):
    """CRM field -> view path, per kind; a kind given replaces that kind's default entirely."""

    class Meta:
        unknown = RAISE

    lead = _mapping(DEFAULT_LEAD_MAPPING)
    deal = _mapping(DEFAULT_DEAL_MAPPING)


_auth_header = free_header(_OWN_HEADERS)


class CrmOptions(Schema):
    class Meta:
        unknown = RAISE  # a misspelt option stops start-up instead of being ignored

    base_url = http_url(required=True, allow_query=False)
    paths = fields.Nested(CrmPaths, load_default=lambda: dict(DEFAULT_PATHS))
    auth_header = fields.String(load_default="Authorization", validate=_auth_header)
    auth_value = fields.String(required=True, validate=[Length(min=1), header_value])
    timeout = timeout_field()
    mapping = fields.Nested(CrmMappings, load_default=lambda: {
        "lead": dict(DEFAULT_LEAD_MAPPING), "deal": dict(DEFAULT_DEAL_MAPPING)})

    @post_load
    def _normalise(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data["base_url"] = data["base_url"].rstrip("/")
        data["paths"] = {kind: None if path is None else path.rstrip("/")
                         for kind, path in data["paths"].items()}
        return data


def idempotency_key(dedup_key: str) -> str:
    """The event's dedup_key as is when it is a plain header value (visible ASCII, at most 255
    characters), else "sha256:<hex of it>": stable across redeliveries either way."""
    if _SAFE_KEY.fullmatch(dedup_key):
        return dedup_key
    return "sha256:" + hashlib.sha256(dedup_key.encode("utf-8", "surrogatepass")).hexdigest()


class CrmSink(Sink):
    """PUT {base_url}{path}/{key} per lead or deal event, with a JSON body built from `mapping`.

    The key is the event's entity key, URL-quoted: a lead's uuid, else its legacy id, else its
    e-mail (event.entity_id); a deal's RD id (a key of dots only is a PermanentSinkError). Body:
    `mapping` in order, each value the view path's value through workers.view.jsonable; paths
    that are absent or null are left out, so a field an event does not carry never blanks the
    CRM's value. Encoding: sinks.http.json_body (json.dumps, separators "," and ":", UTF-8).
    Events with neither a lead nor a deal are not for this sink.
    An event whose lead or deal a newer event has changed since is not sent (latest_state_only),
    but for the fields of the mapping no newer event going to the sink carries (`narrowed`).
    """

    name = "crm"
    Options = CrmOptions
    latest_state_only = True  # a late, older event must not undo a newer one in the CRM

    def __init__(self, instance: str, options: dict[str, Any]):
        super().__init__(instance, options)
        self.session = new_session()
        self.label = f"crm sink {instance!r}"

    def body(self, event: Event, kind: str) -> dict[str, Any]:
        data = view(event)
        out: dict[str, Any] = {}
        for name, path in self.options["mapping"][kind].items():
            if event.only is not None and name not in event.only:
                continue
            value = lookup(data, path)
            if value is not MISSING and value is not None:
                out[name] = jsonable(value)
        return out

    def narrowed(self, older: Event, newer: list[Event]) -> Event | None:
        """The fields of an older lead event that none of the newer events carries (a phone,
        custom fields they have not), sent alone: it is the newest to carry each of them, so
        none of a newer event's values is put back to an older one, and none is lost to the
        CRM. A null in a lead event is a field it does not carry, as the leads table reads it."""
        if older.lead is None:  # a deal event is the deal's whole state: a field a newer one
            return None  # leaves out or sets to null was cleared in RD, not left unsaid
        carried = {name for event in newer for name in self.body(event, "lead")}
        missing = set(self.body(older, "lead")) - carried
        return dataclasses.replace(older, only=frozenset(missing)) if missing else None

    def request(self, event: Event) -> tuple[str, bytes, dict[str, str], str] | None:
        """(url, body, headers, kind) of the request for `event`; None when there is none."""
        if event.lead is not None:
            kind, key = "lead", event.entity_id
        elif event.deal is not None:
            kind, key = "deal", event.deal.get("id")
        else:
            return None
        path = self.options["paths"][kind]
        if path is None:
            return None
        if key is None or str(key) == "":
            raise PermanentSinkError(f"{self.label}: the {kind} has no key to address it by")
        if not str(key).strip("."):
            # "." and ".." are dot segments that URL normalisation drops, so the PUT would reach
            # the collection or above; %2E does not help (requests decodes it back to ".")
            raise PermanentSinkError(f"{self.label}: the {kind} key {str(key)!r} is only dots, "
                                     "which a URL path cannot address")
        url = f"{self.options['base_url']}{path}/{quote(str(key), safe='')}"
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            self.options["auth_header"]: self.options["auth_value"],
            # a narrowed send is another request than the event's whole one (which a CRM may
            # have stored under the event's key): a key of its own, the same for the same fields
            "Idempotency-Key": idempotency_key(event.dedup_key if event.only is None else
                                               f"{event.dedup_key}:only:"
                                               + ",".join(sorted(event.only))),
            "X-Leadpipe-Event-Id": event.id,
        }
        return url, json_body(self.body(event, kind)), headers, kind

    def deliver(self, event: Event) -> int | None:
        request = self.request(event)
        if request is None:
            return None
        url, body, headers, kind = request
        return send(self.session, "PUT", url, body=body, headers=headers,
                    timeout=self.options["timeout"], label=f"{self.label} PUT {kind}").status_code

    def close(self) -> None:
        self.session.close()
