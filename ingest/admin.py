"""The operator API under /api: sinks (pause, resume), dead letters (replay), erasure."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, request

from ingest.errors import error
from ingest.session import current_operator, require_operator

log = logging.getLogger("leadpipe.ops")
bp = Blueprint("admin", __name__, url_prefix="/api")


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data, default=str), status=status, mimetype="application/json")


def _runtime():  # type: ignore[no-untyped-def]
    """The workers' runtime, built on first use so the ingest path never pays for it."""
    ext = current_app.extensions["leadpipe"]
    if ext.runtime is None:
        from workers.app import make_celery

        ext.runtime = make_celery(ext.settings).leadpipe.runtime()
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

    limit = request.args.get("limit", "100")
    if not limit.isdigit() or not 0 < int(limit) <= 1000:
        return error(400, "INVALID", "limit must be a number from 1 to 1000.")
    rows = operations.dead_letters(_runtime().settings.database_url, request.args.get("sink"),
                                   int(limit), request.args.get("all") == "true")
    return _json({"dead_letters": rows})


@bp.post("/dead-letters/<int:letter_id>/replay")
def replay_one(letter_id: int) -> Response:
    from workers import operations

    replayed = operations.replay(_runtime(), ids=[letter_id])
    if not replayed:
        return error(404, "RESOURCE_NOT_FOUND", f"No dead letter {letter_id} waiting for replay.")
    _audit("dead letter replayed", dead_letter=letter_id)
    return _json({"replayed": replayed})


@bp.post("/dead-letters/replay")
def replay_many() -> Response:
    from workers import operations

    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("sink"), str):
        return error(400, "INVALID", 'Send {"sink": NAME} and optionally "since" (ISO-8601).')
    since = None
    if body.get("since") is not None:
        try:
            since = datetime.fromisoformat(str(body["since"]))
        except ValueError:
            return error(400, "INVALID", "since must be an ISO-8601 time.")
    replayed = operations.replay(_runtime(), sink=body["sink"], since=since)
    _audit("dead letters replayed", sink=body["sink"], replayed=replayed)
    return _json({"replayed": replayed})


@bp.post("/erase")
def erase() -> Response:
    """Remove one person everywhere: {"email": ...} -> {"erased": {store: rows touched}}."""
    from workers import retention

    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("email"), str):
        return error(400, "INVALID", 'Send {"email": ADDRESS}.')
    runtime = _runtime()
    try:
        with runtime.pool.connection() as conn:
            touched = retention.erase(conn, runtime.stream, body["email"])
    except ValueError as exc:
        return error(400, "INVALID", str(exc))
    current_app.logger.info("erasure done", extra={"touched": touched})  # no address logged
    return _json({"erased": touched})
