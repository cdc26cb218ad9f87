"""The webhook sink: POST each event as JSON, signed the Standard Webhooks way."""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from datetime import UTC, datetime
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields
from standardwebhooks import Webhook

from sinks.base import Sink
from sinks.http import (
    free_header,
    header_value,
    http_url,
    json_body,
    new_session,
    send,
    timeout_field,
)
from workers.events import Event
from workers.normalize import parse_body

SECRET_PREFIX = "whsec_"  # noqa: S105 (the format's prefix, not a secret)
MIN_SECRET_BYTES = 24  # the Standard Webhooks spec asks for 24 to 64 random bytes

# Headers the sink sets itself; `headers` may not take their place.
_OWN_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding",
                          "webhook-id", "webhook-timestamp", "webhook-signature"})


def whsec_secret(value: str) -> None:
    """Validator: "whsec_" + base64 of at least MIN_SECRET_BYTES bytes. Never echoes the value."""
    if not value.startswith(SECRET_PREFIX):
        raise ValidationError(f"Must be a Standard Webhooks secret: {SECRET_PREFIX}<base64>.")
    encoded = value[len(SECRET_PREFIX):]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(f"What follows {SECRET_PREFIX} must be base64.") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValidationError(f"Must decode to at least {MIN_SECRET_BYTES} bytes.")


_extra_header = free_header(_OWN_HEADERS)


class WebhookOptions(Schema):
    class Meta:
        unknown = RAISE  # a misspelt option stops start-up instead of being ignored

    url = http_url(required=True)
    secret = fields.String(required=True, validate=whsec_secret)
    timeout = timeout_field()
    headers = fields.Dict(keys=fields.String(validate=_extra_header),
                          values=fields.String(validate=header_value),
                          load_default=lambda: {})


def webhook_id(dedup_key: str) -> str:
    """The `webhook-id`: the same for every delivery of one event, so receivers can dedup."""
    digest = hashlib.sha256(dedup_key.encode("utf-8", "surrogatepass")).hexdigest()
    return "evt_" + digest[:32]


def event_body(event: Event) -> dict[str, Any]:
    """What is POSTed, in this key order:

    {"event_type": ..., "event_id": ..., "occurred_at": ISO-8601, "payload": <the raw event as
    RD sent it>}. (A later change moves Marketing events to RD's own v2 shape.)
    """
    return {
        "event_type": event.event_type,
        "event_id": event.id,
        "occurred_at": event.occurred_at.isoformat(),
        "payload": parse_body(event.payload.encode("utf-8")),
    }


class WebhookSink(Sink):
    """POST {url} with `event_body(event)` encoded by sinks.http.json_body, and the headers
    webhook-id (stable per event), webhook-timestamp (Unix seconds of this attempt) and
    webhook-signature (v1, HMAC-SHA256 by the standardwebhooks package)."""

    name = "webhook"
    Options = WebhookOptions

    def __init__(self, instance: str, options: dict[str, Any]):
        super().__init__(instance, options)
        self.signer = Webhook(options["secret"])
        self.session = new_session()
        self.label = f"webhook sink {instance!r}"

    def request(self, event: Event, now: float | None = None) -> tuple[bytes, dict[str, str]]:
        """(body, headers) of the request for `event`, signed at `now` (default: the clock)."""
        data = json_body(event_body(event))
        msg_id = webhook_id(event.dedup_key)
        timestamp = int(time.time() if now is None else now)
        signature = self.signer.sign(msg_id, datetime.fromtimestamp(timestamp, UTC),
                                     data.decode("utf-8"))
        headers = {
            **self.options["headers"],
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
        return data, headers

    def deliver(self, event: Event) -> int | None:
        data, headers = self.request(event)
        return send(self.session, "POST", self.options["url"], body=data, headers=headers,
                    timeout=self.options["timeout"], label=f"{self.label} POST").status_code

    def close(self) -> None:
        self.session.close()
