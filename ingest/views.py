"""POST /webhooks/rdstation: authenticate, sanity-check, append the raw body to Redis, answer."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import orjson
import redis
from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import ClientDisconnected

from ingest.errors import error
from ingest.queue import new_event_id

if TYPE_CHECKING:
    from config.settings import Settings
    from ingest import Ingest
    from ingest.spool import Spool

bp = Blueprint("ingest", __name__)

_EMPTY_OK = Response(b'{"status":"ok"}', status=200, mimetype="application/json")
KNOWN_HINTS = frozenset({"WEBHOOK.CONVERTED", "WEBHOOK.MARKED_OPPORTUNITY"})


def is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or mimetype.endswith("+json")


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def loads(body: bytes) -> object:
    """JSON text to Python; raises ValueError (or RecursionError) for anything that is not JSON.

    orjson reads almost every body; what it refuses is read again by the standard library for
    the two things that are still JSON: integers past 64 bits and escaped lone surrogates
    (RFC 8259 allows them; the workers store them as U+FFFD). Its extensions (NaN, Infinity)
    are refused.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body, parse_constant=_not_json)


def body_shape(body: bytes) -> str:
    """"object", "empty" ({}), "other" (JSON but not an object) or "invalid"."""
    try:
        value = loads(body)
    except (ValueError, RecursionError):
        return "invalid"
    if isinstance(value, dict):
        return "object" if value else "empty"
    return "other"


@bp.post("/webhooks/rdstation")
def receive() -> Response:
    ext = current_app.extensions["leadpipe"]
    settings = ext.settings
    token = request.args.get("token") or request.headers.get(settings.ingest_token_header)
    if not ext.tokens.accepts(token):
        return error(401, "UNAUTHORIZED", "Invalid token.")
    length = request.content_length
    if length is not None and length > settings.max_body_bytes:
        return error(413, "PAYLOAD_TOO_LARGE",
                     f"Body larger than {settings.max_body_bytes} bytes.")
    try:
        if length is None:  # chunked: the size is known only by reading, so read one past
            body = request.stream.read(settings.max_body_bytes + 1)
            if len(body) > settings.max_body_bytes:
                return error(413, "PAYLOAD_TOO_LARGE",
                             f"Body larger than {settings.max_body_bytes} bytes.")
        else:
            body = request.get_data(cache=False)
    except ClientDisconnected as exc:  # werkzeug's, for a read that raised or ended early
        return unreadable(current_app.logger, exc.__cause__ or exc.__context__)
    except READ_ERRORS as exc:  # the server's own (a chunk size that is no number...): its
        return unreadable(current_app.logger, exc)  # message may quote the body
    if length is not None and len(body) != length:  # the client closed early
        return unreadable(current_app.logger, None)
    if not body.strip():
        return _EMPTY_OK  # RD probes a URL with an empty POST before subscribing it
    if not is_json(request.mimetype):
        return error(415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type must be application/json.")
    shape = body_shape(body)
    if shape == "invalid":
        return error(400, "BAD_REQUEST", "Body is not valid JSON.")
    if shape == "other":
        return error(400, "BAD_REQUEST", "Body must be a JSON object.")
    if shape == "empty":
        return _EMPTY_OK
    hint = request.args.get("event_type")
    if hint is not None and hint not in KNOWN_HINTS:
        return error(400, "INVALID", "event_type must be WEBHOOK.CONVERTED or "
                                     "WEBHOOK.MARKED_OPPORTUNITY.")
    event_id = store(ext, body, hint, current_app.logger)
    if event_id is None:
        return unavailable(settings)
    return Response(b'{"id":"%s"}' % event_id.encode(), status=202, mimetype="application/json")


def _read_errors() -> tuple[type[Exception], ...]:
    """What a server's `wsgi.input` raises for a body it cannot read as framed (a connection
    closed early, gunicorn's parse errors); anything else is a bug, answered 500 and logged."""
    try:
        from gunicorn.http.errors import ParseException
    except ImportError:  # (another server)
        return (OSError, ValueError)
    return (OSError, ValueError, ParseException)


READ_ERRORS = _read_errors()


def unreadable(log: logging.Logger, exc: BaseException | None) -> Response:
    """The answer to a body the server could not read as announced (shorter than its
    Content-Length, or chunks it could not parse): the exception's type is logged, never its
    text, which may quote the body."""
    log.warning("request body unreadable: %s", type(exc).__name__ if exc else "short read")
    return error(400, "BAD_REQUEST", "Body could not be read as sent (shorter than its "
                                     "Content-Length, or broken chunked framing).")


def store(ext: Ingest, body: bytes, hint: str | None, log: logging.Logger) -> str | None:
    """Durably append a body to the stream: its new event id, or None if Redis cannot take it."""
    event_id = new_event_id()
    spool = ext.spool
    if spool is None:
        try:
            ext.stream.append(event_id, body, hint)
        except redis.RedisError:
            log.warning("ingest stream unavailable; answered 503")
            return None
        return event_id
    tried = spool.redis_allowed()  # Redis, unless it failed a moment ago
    if tried and _to_redis(ext, spool, event_id, body, hint):
        return event_id
    try:
        spool.append(event_id, body, hint)
    except OSError:
        # a spool that refuses (a full disk) while Redis was passed over: Redis once more
        if not tried and _to_redis(ext, spool, event_id, body, hint):
            return event_id
        log.error("ingest stream unavailable and the spool refused; answered 503")
        return None
    log.warning("ingest stream unavailable; spooled", extra={"event_id": event_id})
    return event_id


def _to_redis(ext: Ingest, spool: Spool, event_id: str, body: bytes, hint: str | None) -> bool:
    """Append to the stream, telling the spool whether Redis took it."""
    try:
        ext.stream.append(event_id, body, hint)
    except redis.RedisError:
        spool.redis_failed()
        return False
    spool.redis_answered()
    return True


def unavailable(settings: Settings) -> Response:
    """503 with Retry-After: never a 2xx for a body that is not on the stream."""
    return error(503, "SERVICE_UNAVAILABLE", "Storage unavailable; retry later.",
                 headers={"Retry-After": str(settings.retry_after_seconds)})
