"""Marshmallow schemas of /integrations/webhooks: what the API validates and what OpenAPI shows.

Every error message a schema can produce is declared with `message(error_type, text)`, so a
marshmallow error maps back to RD Station's `error_type` names (`rd_errors`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

EVENT_TYPES = ("WEBHOOK.CONVERTED", "WEBHOOK.MARKED_OPPORTUNITY",
               "crm_deal_created", "crm_deal_updated", "crm_deal_deleted")
ENTITY_TYPES = ("CONTACT",)
HTTP_METHODS = ("POST",)
RELATIONS = ("COMPANY", "CONTACT_FUNNEL")
STATUSES = ("active", "suspended", "inactive")
SOURCES = ("MKT", "CRM")
MAX_URL = 2048
MAX_IDENTIFIER = 255
MAX_IDENTIFIERS = 100

_TYPE_OF: dict[str, str] = {}


def message(error_type: str, text: str) -> str:
    """Declare an error message and the RD error_type it stands for; returns the text."""
    if _TYPE_OF.setdefault(text, error_type) != error_type:
        raise ValueError(f"message {text!r} already stands for {_TYPE_OF[text]}")
    return text


NULL = message("CANNOT_BE_NULL", "can't be null")
BLANK = message("CANNOT_BE_BLANK", "can't be blank")
NOT_STRING = message("MUST_BE_STRING", "must be a string")
NOT_STRING_ARRAY = message("MUST_BE_STRING_ARRAY", "must be an array of strings")
INVALID_URL = message("INVALID", "must be an absolute http:// or https:// URL")
URL_TOO_LONG = message("TOO_LONG", f"is too long (at most {MAX_URL} characters)")
IDENTIFIER_TOO_LONG = message(
    "TOO_LONG", f"has an identifier that is too long (at most {MAX_IDENTIFIER} characters)")
TOO_MANY = message("TOO_LONG", f"is too long (at most {MAX_IDENTIFIERS} items)")
BLANK_ITEM = message("CANNOT_BE_BLANK", "can't contain a blank identifier")
NOT_TEXT = message("INVALID", "can't contain NUL or unpaired surrogate characters")


def _is_text(value: str) -> bool:
    """Storable as Postgres text: UTF-8 encodable (no lone surrogates from JSON escapes), no NUL."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


class Choice(validate.Validator):
    """One of a fixed set of strings; blank is CANNOT_BE_BLANK rather than a wrong choice.

    `choices` is what apispec reads to write the `enum` of the OpenAPI schema."""

    def __init__(self, choices: Iterable[str], error_type: str):
        self.choices = tuple(choices)
        self.wrong = message(error_type, f"must be one of: {', '.join(self.choices)}")

    def __call__(self, value: str) -> str:
        if not value.strip():
            raise ValidationError(BLANK)
        if value not in self.choices:
            raise ValidationError(self.wrong)
        return value


_URL_SHAPE = validate.URL(schemes={"http", "https"}, require_tld=False, error=INVALID_URL)


def http_url(value: str) -> str:
    """Not blank, not too long, an absolute http(s) URL with a host, a numeric port if any."""
    if not value.strip():
        raise ValidationError(BLANK)
    if len(value) > MAX_URL:
        raise ValidationError(URL_TOO_LONG)
    if not _is_text(value) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValidationError(INVALID_URL)
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for a port that is not a number up to 65535
    except ValueError:
        raise ValidationError(INVALID_URL) from None
    if not parts.hostname or port == 0:  # port 0 reaches no one
        raise ValidationError(INVALID_URL)
    if parts.hostname.isascii() and parts.hostname.isdigit():
        # an address written as one number (1572394766 for 93.184.215.14) is refused as the
        # other short forms are: it would subscribe one endpoint twice under two names
        raise ValidationError(INVALID_URL)
    return _URL_SHAPE(value)  # the scheme, and the host's and path's shape


def identifier(value: str) -> str:
    if not value.strip():
        raise ValidationError(BLANK_ITEM)
    if len(value) > MAX_IDENTIFIER:
        raise ValidationError(IDENTIFIER_TOO_LONG)
    if not _is_text(value):
        raise ValidationError(NOT_TEXT)
    return value


def _string(**kwargs: Any) -> fields.String:
    """A string field whose every error speaks RD's types."""
    return fields.String(error_messages={"required": NULL, "null": NULL, "invalid": NOT_STRING,
                                         "invalid_utf8": NOT_STRING}, **kwargs)


def _string_list(item_validator: Any, **kwargs: Any) -> fields.List:
    item = fields.String(validate=item_validator,
                         error_messages={"null": NOT_STRING_ARRAY, "invalid": NOT_STRING_ARRAY,
                                         "invalid_utf8": NOT_STRING_ARRAY})
    return fields.List(item, allow_none=True, load_default=list,
                       validate=validate.Length(max=MAX_IDENTIFIERS, error=TOO_MANY),
                       error_messages={"invalid": NOT_STRING_ARRAY}, **kwargs)


class WebhookInputSchema(Schema):
    """WebhookInput: the body of POST and PUT /integrations/webhooks (all required fields)."""

    class Meta:
        unknown = EXCLUDE  # clients send back what they listed (uuid, created_at...): ignored

    event_type = _string(required=True, validate=Choice(EVENT_TYPES, "INCLUSION"),
                         metadata={"description": "The event that triggers the webhook."})
    entity_type = _string(required=True, validate=Choice(ENTITY_TYPES, "INCLUSION"))
    url = _string(required=True, validate=http_url, metadata={
        "format": "uri", "maxLength": MAX_URL, "example": "https://example.com/rd-webhooks",
        "description": "Where events are POSTed; must answer a POST of {} with a 2xx within "
                       "5 s when the subscription is created or moved to a new URL."})
    http_method = _string(required=True, validate=Choice(HTTP_METHODS, "INCLUSION"))
    event_identifiers = _string_list(identifier, metadata={
        "description": "Only for WEBHOOK.CONVERTED: conversion identifiers that trigger it "
                       "(empty or null: all)."})
    include_relations = _string_list(Choice(RELATIONS, "MUST_BE_VALID_OPTION"), metadata={
        "description": "Relations added to the contact in each delivery."})


class UtcMillis(fields.DateTime):
    """ISO-8601 in UTC with milliseconds and a Z, as RD writes it: 2024-05-01T12:00:00.000Z."""

    def _serialize(self, value: datetime | None, attr: Any, obj: Any, **kwargs: Any) -> str | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


class WebhookSchema(WebhookInputSchema):
    """Webhook: a subscription as the API answers it (the lists always present, maybe empty)."""

    class Meta:
        unknown = EXCLUDE

    event_identifiers = fields.List(fields.String(), required=True)
    include_relations = fields.List(fields.String(validate=validate.OneOf(RELATIONS)),
                                    required=True)
    uuid = fields.UUID(dump_only=True, required=True)
    created_at = UtcMillis(dump_only=True, required=True)
    updated_at = UtcMillis(dump_only=True, required=True)
    status = fields.String(dump_only=True, required=True, validate=validate.OneOf(STATUSES))
    source = fields.String(dump_only=True, required=True, validate=validate.OneOf(SOURCES),
                           metadata={"description": "MKT for WEBHOOK.*, CRM for crm_deal_*."})
    platform_account_id = fields.Integer(dump_only=True, required=True, metadata={
        "format": "int64", "description": "The account's id; may be beyond 2^53."})


class CreatedWebhookSchema(WebhookSchema):
    """The answer to a create: the Webhook plus its signing secret, shown only this once."""

    secret = fields.String(dump_only=True, required=True, metadata={
        "description": "Standard Webhooks signing secret (whsec_...) of the deliveries. Shown "
                       "once, on creation."})


class RotatedSecretSchema(Schema):
    """The answer to a secret rotation: the new secret, shown only this once."""

    uuid = fields.UUID(dump_only=True, required=True)
    secret = fields.String(dump_only=True, required=True, metadata={
        "description": "The new Standard Webhooks signing secret (whsec_...)."})
    previous_secret_expires_at = UtcMillis(dump_only=True, required=True, metadata={
        "description": "Until then deliveries carry a signature by the old secret too."})


class WebhookListSchema(Schema):
    webhooks = fields.List(fields.Nested(WebhookSchema), required=True)


class ErrorDetailSchema(Schema):
    error_type = fields.String(required=True, metadata={"example": "RESOURCE_NOT_FOUND"})
    error_message = fields.String(required=True)


class ErrorSchema(Schema):
    """One error: {"errors": {"error_type": ..., "error_message": ...}}."""

    errors = fields.Nested(ErrorDetailSchema, required=True)


class FieldErrorsSchema(Schema):
    """Errors by field: {"errors": {"url": [{"error_type": "CANNOT_BE_NULL", ...}]}}."""

    errors = fields.Dict(keys=fields.String(),
                         values=fields.List(fields.Nested(ErrorDetailSchema)), required=True)


def rd_errors(messages: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """marshmallow's messages -> RD's errors by field, with one entry per distinct message.

    A list field's per-item messages ({0: [...], 3: [...]}) become the list field's own."""
    out: dict[str, list[dict[str, str]]] = {}
    for name, found in messages.items():
        texts: list[str] = []
        _collect(found, texts)
        out[str(name)] = [{"error_type": _TYPE_OF.get(text, "INVALID"), "error_message": text}
                          for text in dict.fromkeys(texts)]
    return out


def _collect(found: Any, into: list[str]) -> None:
    if isinstance(found, str):
        into.append(found)
    elif isinstance(found, dict):
        for value in found.values():
            _collect(value, into)
    elif isinstance(found, list | tuple):
        for value in found:
            _collect(value, into)
