"""The operator API under /api: sinks (pause, resume), dead letters (replay), erasure."""

from __future__ import annotations

import logging
from typing import Any

import kombu.exceptions
import orjson
import psycopg
import redis
from flask import Blueprint, Response, current_app, request
from psycopg_pool import PoolTimeout

from config import pii
from config.inputs import Invalid, instant, whole_number
from ingest.errors import NOT_MIGRATED, error, not_migrated
from ingest.session import current_operator, require_operator

log = logging.getLogger("leadpipe.ops")
bp = Blueprint("admin", __name__, url_prefix="/api")


def invalid(exc: Invalid) -> Response:
    return error(400, "INVALID", str(exc))


def store_down(exc: Exception) -> Response:
    """503 with Retry-After when Postgres or Redis cannot answer, never a 500."""
    redis_side = isinstance(exc, redis.RedisError | kombu.exceptions.OperationalError)
    log.warning("operator API: %s unavailable: %s", "Redis" if redis_side else "Postgres",
                type(exc).__name__)
    return error(503, "SERVICE_UNAVAILABLE", "Postgres or Redis unavailable; retry later.",
                 headers={"Retry-After": "5"})


def operator_errors(blueprint: Blueprint) -> None:
    """The answers every operator blueprint gives for refused input and stores that are down."""
    blueprint.register_error_handler(Invalid, invalid)
    for kind in NOT_MIGRATED:
        blueprint.register_error_handler(kind, not_migrated)
    for kind in (redis.RedisError, kombu.exceptions.OperationalError, psycopg.OperationalError,
                 PoolTimeout):
        blueprint.register_error_handler(kind, store_down)


operator_errors(bp)


def text(value: object, name: str, max_length: int = 1000) -> str:
    """A string Postgres can take (no NUL, no lone surrogate) of at most `max_length`."""
    if isinstance(value, str) and "\x00" not in value and len(value) <= max_length:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return value
    raise Invalid(f"{name} must be a text of at most {max_length} characters, without NUL.")


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data, default=str), status=status, mimetype="application/json")


def _runtime():  # type: ignore[no-untyped-def]
    """The workers' runtime, built on first use so the ingest path never pays for it."""
    ext = current_app.extensions["leadpipe"]
    if ext.runtime is None:
        from workers.app import make_celery

        # a store down or not answering makes a 503 (a publish: the relay) in seconds, not a
        # request thread (shared with ingest) held for minutes or for good
        ext.runtime = make_celery(ext.settings, socket_timeout=ext.settings.redis_timeout_seconds
                                  ).leadpipe.runtime(interactive=True)
    return ext.runtime


bp.before_request(require_operator)  # a Bearer admin token, or the /ops session and CSRF token


def _audit(what: str, **details: Any) -> None:
    """Who changed what, by the token's fingerprint (never the token)."""
    operator = current_operator()
    log.info(what, extra={"operator": operator.who if operator else None, **details})


@bp.get("/sinks")
def sinks() -> Response:
    from workers import operations

    return _json({"sinks": operations.sink_states(_runtime())})


@bp.post("/sinks/<name>/<any(pause, resume):action>")
def sink_action(name: str, action: str) -> Response:
    from workers import operations

    try:
        getattr(operations, action)(_runtime(), name)
    except LookupError as exc:
        return error(404, "RESOURCE_NOT_FOUND", str(exc))
    _audit(f"sink {action}d", sink=name)
    return _json({"sink": name, "paused": action == "pause"})


@bp.get("/dead-letters")
def dead_letters() -> Response:
    from workers import operations

    limit = whole_number(request.args.get("limit", "100"), "limit", 1, 1000)
    sink = request.args.get("sink")
    if sink is not None:
        sink = text(sink, "sink")
    rows = operations.dead_letters(_runtime().settings.database_url, sink, limit,
                                   request.args.get("all") == "true")
    for row in rows:  # masked as on the dashboard: an error text may quote a destination's
        row["error"] = pii.mask_text(row["error"] or "")  # answer naming the person
    return _json({"dead_letters": rows})


@bp.post("/dead-letters/<letter_id>/replay")
def replay_one(letter_id: str) -> Response:
    from workers import operations

    number = whole_number(letter_id, "The dead letter id")
    try:
        replayed = operations.replay(_runtime(), ids=[number])
    except LookupError as exc:  # its sink is no longer configured
        return error(404, "RESOURCE_NOT_FOUND", str(exc))
    if not replayed:
        return error(404, "RESOURCE_NOT_FOUND", f"No dead letter {number} waiting for replay.")
    _audit("dead letter replayed", dead_letter=number)
    return _json({"replayed": replayed})


def json_object() -> dict[str, Any] | None:
    """The request's JSON object; None for anything else: no JSON, JSON that is no object, or
    nesting too deep to parse (a RecursionError, which get_json(silent=True) lets through)."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        return None
    return body if isinstance(body, dict) else None


@bp.post("/dead-letters/replay")
def replay_many() -> Response:
    from workers import operations

    body = json_object()
    if body is None or not isinstance(body.get("sink"), str):
        return error(400, "INVALID", 'Send {"sink": NAME} and optionally "since" (ISO-8601).')
    sink = text(body["sink"], "sink")
    since = None if body.get("since") is None else instant(body["since"], "since")
    try:
        replayed = operations.replay(_runtime(), sink=sink, since=since)
    except LookupError as exc:  # no such sink
        return error(404, "RESOURCE_NOT_FOUND", str(exc))
    _audit("dead letters replayed", sink=sink, replayed=replayed)
    return _json({"replayed": replayed})


@bp.post("/erase")
def erase() -> Response:
    """Remove one person everywhere: {"email": ...} -> {"erased": {store: rows touched}}."""
    from workers import retention

    body = json_object()
    if body is None or not isinstance(body.get("email"), str):
        return error(400, "INVALID", 'Send {"email": ADDRESS}.')
    email = text(body["email"], "email")
    runtime = _runtime()
    try:
        with runtime.pool.connection() as conn:
            touched = retention.erase(conn, runtime.stream, email)
    except ValueError as exc:
        return error(400, "INVALID", str(exc))
    except (retention.ErasureBusy, retention.ErasureUnfinished) as exc:
        log.warning("erasure not done: %s", type(exc.__cause__ or exc).__name__)
        said = str(exc)
        return error(503, "SERVICE_UNAVAILABLE", said[:1].upper() + said[1:] + ".",
                     headers={"Retry-After": "5"})
    _audit("erasure done", touched=touched)  # the operator, never the address
    rewrite = retention.rewrite_append_only_file(runtime.redis, wait=retention.AOF_WAIT_SECONDS)
    return _json({"erased": touched, "redis_log": rewrite})
