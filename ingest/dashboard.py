"""The JSON the /ops page polls: overview, workers, quarantine, and revealing one record's PII."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, request

from config.inputs import finite_number, whole_number
from ingest.admin import _json, _runtime, json_object, operator_errors, text
from ingest.errors import error
from ingest.session import current_operator, require_operator

log = logging.getLogger("leadpipe.ops")
bp = Blueprint("dashboard", __name__, url_prefix="/api")
bp.before_request(require_operator)
operator_errors(bp)


@bp.get("/dashboard")
def overview() -> Response:
    """Rates, totals, the last hour per minute, sinks, dead letters and quarantine (PII masked)."""
    from workers import dashboard

    return _json(dashboard.overview(_runtime()))


@bp.get("/workers")
def workers() -> Response:
    """This namespace's Celery workers that answer inspect within `timeout` s (default 1, max 3)."""
    from workers import status

    seconds = finite_number(request.args.get("timeout", "1"), "timeout (seconds)")
    timeout = min(max(seconds, 0.1), 3.0)
    runtime = _runtime()
    # the broker first, on the runtime's quick client: unreachable or not answering, a 503 in
    # seconds (Celery's own connection would retry for minutes, or answer "no workers")
    runtime.redis.ping()
    return _json({"workers": status.workers(runtime.app, timeout), "timeout": timeout})


@bp.get("/quarantine")
def quarantine() -> Response:
    from workers import dashboard

    limit = whole_number(request.args.get("limit", "20"), "limit", 1, 500)
    return _json({"quarantine": dashboard.quarantine(_runtime(), limit)})


@bp.post("/reveal")
def reveal() -> Response:
    """{"kind": "dead_letter" | "quarantine", "id": ...} -> the person unmasked; audited."""
    from workers import dashboard

    body = json_object()
    if (body is None or not isinstance(body.get("kind"), str)
            or body["kind"] not in dashboard.REVEALABLE
            or not isinstance(body.get("id"), str | int) or isinstance(body["id"], bool)):
        return error(400, "INVALID", 'Send {"kind": "dead_letter" or "quarantine", "id": ID}.')
    kind = body["kind"]
    if kind == "dead_letter":  # a bigint
        record_id = str(whole_number(body["id"], "id"))
    else:  # an event id
        record_id = text(str(body["id"]), "id", max_length=200)
    person = dashboard.reveal(_runtime(), kind, record_id)
    if person is None:
        return error(404, "RESOURCE_NOT_FOUND", f"No {kind} {record_id}.")
    operator = current_operator()
    log.info("pii revealed", extra={  # who saw whose record; never the values
        "operator": operator.who if operator else None, "kind": kind, "record_id": record_id})
    return _json({"kind": kind, "id": record_id, "person": person})
