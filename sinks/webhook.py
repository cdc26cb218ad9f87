"""The webhook sink: POST each event as JSON, signed the Standard Webhooks way."""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from datetime import UTC, datetime
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate
from standardwebhooks import Webhook

from ingest import ssrf
from sinks.base import PermanentSinkError, RetryableSinkError, Sink
from sinks.http import (
    free_header,
    header_value,
    http_url,
    json_body,
    send,
    timeout_field,
)
from sinks.transport import Deadline, new_session
from workers.events import Event
from workers.normalize import parse_body
from workers.rdshape import COMPANY, CONTACT_FUNNEL, rd_body

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
    # "envelope": Leadpipe's {event_type, event_id, occurred_at, payload}; "rd": RD's own body
    body = fields.String(load_default="envelope", validate=validate.OneOf(("envelope", "rd")))
    include_relations = fields.List(
        fields.String(validate=validate.OneOf((COMPANY, CONTACT_FUNNEL))),
        load_default=lambda: [])
    # rotation: the old secret also signs until it expires, so receivers can switch at leisure
    previous_secret = fields.String(load_default=None, allow_none=True, validate=whsec_secret)
    previous_secret_expires_at = fields.AwareDateTime(load_default=None, allow_none=True)
    # set: check the URL's addresses before every request (DNS may have changed since)
    ssrf_allow = fields.List(fields.String(), load_default=None, allow_none=True)
    # every answer but a 2xx is tried again (RD's rule for the URLs it calls), not only 408,
    # 429 and 5xx: for a receiver that answers 404 or 410 while it is being deployed
    retry_any_status = fields.Boolean(load_default=False)


def webhook_id(dedup_key: str) -> str:
    """The `webhook-id`: the same for every delivery of one event, so receivers can dedup."""
    digest = hashlib.sha256(dedup_key.encode("utf-8", "surrogatepass")).hexdigest()
    return "evt_" + digest[:32]


def event_body(event: Event) -> dict[str, Any]:
    """The "envelope" body, in this key order:

    {"event_type": ..., "event_id": ..., "occurred_at": ISO-8601, "payload": <the raw event as
    RD sent it>}. (The "rd" body is `workers.rdshape.rd_body`.)
    """
    return {
        "event_type": event.event_type,
        "event_id": event.id,
        "occurred_at": event.occurred_at.isoformat(),
        "payload": parse_body(event.payload.encode("utf-8")),
    }


class WebhookSink(Sink):
    """POST {url} with the event's body (`body` option) encoded by sinks.http.json_body, and the
    headers webhook-id (stable per event), webhook-timestamp (Unix seconds of this attempt) and
    webhook-signature (v1, HMAC-SHA256 by the standardwebhooks package; during a secret's
    rotation grace, one signature per secret, space-separated, as the spec allows)."""

    name = "webhook"
    Options = WebhookOptions

    def __init__(self, instance: str, options: dict[str, Any]):
        super().__init__(instance, options)
        self.signer = Webhook(options["secret"])
        # the secrets that sign beside the current one until they expire (None: for good):
        # the previous one, and older ones still in their grace (a subscription's only)
        previous = options.get("previous_secret")
        self.previous: list[tuple[Webhook, datetime | None]] = [
            (Webhook(previous), options.get("previous_secret_expires_at"))] if previous else []
        self.previous += [(Webhook(o["secret"]), o["expires_at"])
                          for o in options.get("older_secrets") or ()]
        allow = options.get("ssrf_allow")
        self.allow = None if allow is None else ssrf.AllowList.parse(allow)
        self.session = new_session()
        self.pinned: ssrf.Target | None = None  # what self.session connects to (with ssrf_allow)
        self.label = f"webhook sink {instance!r}"

    def body(self, event: Event) -> dict[str, Any]:
        if self.options.get("body") == "rd":
            return rd_body(event, self.options.get("include_relations") or ())
        return event_body(event)

    def signature(self, msg_id: str, timestamp: int, data: bytes) -> str:
        """The webhook-signature value: the current secret's, plus each earlier one's while its
        grace lasts."""
        moment = datetime.fromtimestamp(timestamp, UTC)
        text = data.decode("utf-8")
        signatures = [self.signer.sign(msg_id, moment, text)]
        signatures += [signer.sign(msg_id, moment, text) for signer, expires in self.previous
                       if expires is None or moment < expires]
        return " ".join(signatures)

    def request(self, event: Event, now: float | None = None) -> tuple[bytes, dict[str, str]]:
        """(body, headers) of the request for `event`, signed at `now` (default: the clock)."""
        data = json_body(self.body(event))
        msg_id = webhook_id(event.dedup_key)
        timestamp = int(time.time() if now is None else now)
        signature = self.signature(msg_id, timestamp, data)
        headers = {
            **self.options["headers"],
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
        return data, headers

    def deliver(self, event: Event) -> int | None:
        url, timeout = self.options["url"], self.options["timeout"]
        with Deadline(timeout) as deadline:  # the lookup and the request share `timeout`
            if self.allow is not None:
                try:  # the URL was checked when subscribed; its DNS may point elsewhere now
                    target = ssrf.check_url(url, self.allow, timeout=deadline.remaining())
                except ssrf.Unresolved as exc:  # a resolver's bad moment, or a name that
                    # lapsed: retried, the rounds decide; out of time, it is the sink's timeout
                    if deadline.remaining() <= 0:
                        raise RetryableSinkError(f"{self.label} POST: no answer within "
                                                 f"{timeout:g} s (resolving the host)") from None
                    raise RetryableSinkError(f"{self.label}: {exc}") from None
                except ssrf.Refused as exc:  # for operators (dead letters): where it pointed
                    detail = f" ({exc.detail})" if exc.detail else ""
                    raise PermanentSinkError(f"{self.label}: refused: {exc}{detail}") from None
                self._pin(target)
                url = target.url
            data, headers = self.request(event)
            return send(self.session, "POST", url, body=data, headers=headers,
                        timeout=timeout, label=f"{self.label} POST",
                        retry_any_status=self.options["retry_any_status"],
                        deadline=deadline).status_code

    def _pin(self, target: ssrf.Target) -> None:
        """Connect only to the addresses just checked: a session pinned to them, kept (with its
        kept-alive connections) while the name keeps resolving to the same ones."""
        if not _same_place(target, self.pinned):
            self.session.close()
            self.session = new_session(pin=target)
            self.pinned = target

    def close(self) -> None:
        self.session.close()


def _same_place(target: ssrf.Target, pinned: ssrf.Target | None) -> bool:
    """The same URL and the same set of addresses (a round-robin resolver changes their order
    from one lookup to the next: that is no reason to drop kept-alive connections)."""
    if pinned is None or (target.url, target.host, target.port) != (
            pinned.url, pinned.host, pinned.port):
        return False
    if target.addresses is None or pinned.addresses is None:
        return target.addresses is pinned.addresses
    return set(target.addresses) == set(pinned.addresses)
