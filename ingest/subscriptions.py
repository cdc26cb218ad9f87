"""/integrations/webhooks: RD Station's subscription API (list, create, show, update, delete).

Field by field as `../shared/spec/rdstation-webhooks.md` section 4 describes it, so RD's own
clients work by changing the base URL. Every route needs an API token (`leadpipe tokens`).
"""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import orjson
import psycopg
import requests
from flask import Blueprint, Response, current_app, g, request
from marshmallow import ValidationError
from psycopg.rows import dict_row

from ingest import ssrf, tokens, views
from ingest.errors import NOT_MIGRATED, error, not_migrated
from ingest.subscription_schemas import (
    CreatedWebhookSchema,
    RotatedSecretSchema,
    WebhookInputSchema,
    WebhookSchema,
    rd_errors,
)
from sinks.transport import Deadline, new_session

bp = Blueprint("subscriptions", __name__, url_prefix="/integrations/webhooks")

PROBE_TIMEOUT = 5.0  # RD's own limit for an answer
_INPUT = WebhookInputSchema()
_WEBHOOK = WebhookSchema()
_CREATED = CreatedWebhookSchema()
_ROTATED = RotatedSecretSchema()
_COLUMNS = ("uuid, event_type, entity_type, url, http_method, event_identifiers, "
            "include_relations, status, source, created_at, updated_at")


class Refusal(Exception):
    """Stop the request with this (RD-shaped) answer."""

    def __init__(self, response: Response):
        super().__init__(response.status)
        self.response = response


def _option(name: str, default: Any) -> Any:
    # getattr: these settings are optional so the blueprint runs before config declares them
    return getattr(current_app.extensions["leadpipe"].settings, name, default)


def _audit(action: str, row: dict[str, Any]) -> None:
    # the URL's host only: subscribers often put a secret in the path or query string
    current_app.logger.info("subscription %s", action, extra={
        "subscription": str(row["uuid"]), "event_type": row["event_type"],
        "host": urlsplit(row["url"]).hostname})


def _json(data: Any, status: int = 200) -> Response:
    # orjson keeps platform_account_id (beyond 2^53) an exact integer
    return Response(orjson.dumps(data), status=status, mimetype="application/json")


def _field_errors(status: int, errors: dict[str, list[dict[str, str]]]) -> Refusal:
    return Refusal(_json({"errors": errors}, status))


def _db() -> psycopg.Connection:
    """This request's connection, opened on first use and closed at its end."""
    if "subscriptions_db" not in g:
        dsn = current_app.extensions["leadpipe"].settings.database_url
        if not dsn:
            raise Refusal(error(503, "SERVICE_UNAVAILABLE", "No database is configured."))
        g.subscriptions_db = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    return g.subscriptions_db


@bp.teardown_app_request  # app-wide: /openapi.json's blueprint opens one to check the token
def _close_db(exc: BaseException | None) -> None:
    conn = g.pop("subscriptions_db", None)
    if conn is not None:
        conn.close()


def _refused(exc: Refusal) -> Response:
    return exc.response


def _database_down(exc: psycopg.OperationalError) -> Response:
    current_app.logger.warning("subscriptions: database unavailable: %s", exc)
    return error(503, "SERVICE_UNAVAILABLE", "Database unavailable; retry later.",
                 headers={"Retry-After": "5"})


def require_api_token() -> Response | None:
    """before_request: a live `Authorization: Bearer <token>` or 401 with a Bearer challenge."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if token and tokens.check(_db(), token) is tokens.Check.VALID:
        return None
    challenge = 'Bearer realm="leadpipe"'
    if token:  # RFC 6750: no error code when the request carried no credentials at all
        challenge += ', error="invalid_token"'
    return error(401, "UNAUTHORIZED", "Invalid token.", headers={"WWW-Authenticate": challenge})


def guard(blueprint: Blueprint) -> None:
    """Every route of `blueprint` needs an API token (`require_api_token`), and the token check's
    own failures answer 503, not 500: no database configured, the database down or not yet
    migrated (with Retry-After). The handlers go with the check to every blueprint that uses it
    (/openapi.json too)."""
    blueprint.before_request(require_api_token)
    blueprint.register_error_handler(Refusal, _refused)
    blueprint.register_error_handler(psycopg.OperationalError, _database_down)
    for kind in NOT_MIGRATED:
        blueprint.register_error_handler(kind, not_migrated)


guard(bp)


# -- request pieces ---------------------------------------------------------------------------


def _input() -> dict[str, Any]:
    """The validated WebhookInput of this request, or a Refusal (415, 400, 422)."""
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise Refusal(error(415, "UNSUPPORTED_MEDIA_TYPE",
                            "Content-Type must be application/json."))
    limit = _option("max_body_bytes", 1024 * 1024)
    if request.content_length is not None and request.content_length > limit:
        raise Refusal(error(413, "PAYLOAD_TOO_LARGE", f"Body larger than {limit} bytes."))
    raw = request.stream.read(limit + 1)  # also bounds a chunked body, whose size is unknown
    if len(raw) > limit:
        raise Refusal(error(413, "PAYLOAD_TOO_LARGE", f"Body larger than {limit} bytes."))
    try:
        body = views.loads(raw)
    except (ValueError, RecursionError):
        raise Refusal(error(400, "BAD_REQUEST", "Body is not valid JSON.")) from None
    if not isinstance(body, dict):
        raise Refusal(error(400, "BAD_REQUEST", "Body must be a JSON object."))
    try:
        data = _INPUT.load(body)
    except ValidationError as exc:
        raise _field_errors(422, rd_errors(exc.normalized_messages())) from None
    data["event_identifiers"] = data.get("event_identifiers") or []
    # a set (RD: "subset of COMPANY, CONTACT_FUNNEL"): each once, in the order first given
    data["include_relations"] = list(dict.fromkeys(data.get("include_relations") or []))
    return data


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise Refusal(error(404, "RESOURCE_NOT_FOUND", "No webhook has this uuid.")) from None


def _not_found(key: uuid.UUID) -> Refusal:
    return Refusal(error(404, "RESOURCE_NOT_FOUND", f"Webhook {key} not found."))


def _taken() -> Refusal:
    return _field_errors(422, {"url": [{
        "error_type": "TAKEN",
        "error_message": "has already been taken for this event_type"}]})


def _check_url(url: str, event_type: str, moved: bool, own: uuid.UUID | None = None,
               unique: bool = True) -> None:
    """SSRF guard, uniqueness (unless the subscription keeps its endpoint and event type),
    then (for a new URL) the probe RD makes before subscribing."""
    try:
        target = ssrf.check_url(url, ssrf.AllowList.parse(_option("ssrf_allow", ())),
                                timeout=PROBE_TIMEOUT)  # a slow resolver holds no API thread
    except ssrf.Unresolved as exc:
        if not exc.temporary:
            raise _field_errors(422, {"url": [{"error_type": "INVALID",
                                               "error_message": str(exc)}]}) from None
        current_app.logger.warning("subscriptions: the resolver failed; answered 503")
        raise Refusal(error(503, "SERVICE_UNAVAILABLE", f"{exc} The URL was not checked.",
                            headers={"Retry-After": "5"})) from None
    except ssrf.Refused as exc:
        current_app.logger.info("subscriptions: URL refused by the SSRF guard",
                                extra={"detail": exc.detail or str(exc)})
        raise _field_errors(422, {"url": [{"error_type": "INVALID",
                                           "error_message": str(exc)}]}) from None
    if unique and _db().execute(
            "SELECT 1 FROM subscriptions WHERE event_type = %s AND url_key = %s "
            "AND uuid IS DISTINCT FROM %s", (event_type, ssrf.endpoint_key(url), own)).fetchone():
        raise _taken()
    if moved and _option("subscription_probe", True):
        problem = probe(url, target=target)  # to the addresses just checked, not a new lookup
        if problem:
            raise Refusal(error(401, "UNAUTHORIZED", (
                f"The URL {problem}. Like RD Station, Leadpipe POSTs {{}} to a URL before "
                f"subscribing it and needs a 2xx within {PROBE_TIMEOUT:g} s.")))


def probe(url: str, timeout: float = PROBE_TIMEOUT,
          target: ssrf.Target | None = None) -> str | None:
    """POST `{}` to `url`: None when it answers 2xx within `timeout` seconds, else why not.

    `timeout` bounds the whole exchange, up to the answer's status and headers (a deadline, not
    requests' per-read timeout): the API thread waiting here also serves ingest. With `target`
    (what `ssrf.check_url` answered for `url`), the probe calls `target.url` and connects only
    to the addresses the guard checked. Redirects are not followed: the SSRF guard checked this
    URL, not wherever it points."""
    started = time.monotonic()
    late = f"did not answer within {timeout:g} s"
    with new_session(pin=target) as session, Deadline(timeout) as deadline:
        try:
            answer = session.post(url if target is None else target.url, data=b"{}",
                                  timeout=timeout, allow_redirects=False, stream=True,
                                  headers={"Content-Type": "application/json"})
            answer.close()
        except requests.Timeout:
            return late
        except requests.RequestException as exc:
            return late if deadline.expired else f"could not be reached ({type(exc).__name__})"
    if deadline.expired or time.monotonic() - started > timeout:
        return late
    if not 200 <= answer.status_code < 300:
        return f"answered the check with HTTP {answer.status_code}"
    return None


def new_secret() -> str:
    """A Standard Webhooks signing secret: whsec_ and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def _source(event_type: str) -> str:
    return "MKT" if event_type.startswith("WEBHOOK.") else "CRM"


def _out(row: dict[str, Any], schema: WebhookSchema = _WEBHOOK) -> dict[str, Any]:
    return schema.dump({**row, "platform_account_id": int(_option("platform_account_id", 0))})


def _fetch(webhook_uuid: uuid.UUID) -> dict[str, Any] | None:
    with _db().cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM subscriptions WHERE uuid = %s", (webhook_uuid,))
        return cur.fetchone()


# -- the five operations ----------------------------------------------------------------------


@bp.get("", strict_slashes=False)
def list_webhooks() -> Response:
    with _db().cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM subscriptions ORDER BY created_at, uuid")
        return _json({"webhooks": [_out(row) for row in cur.fetchall()]})


@bp.post("", strict_slashes=False)
def create_webhook() -> Response:
    data = _input()
    _check_url(data["url"], data["event_type"], moved=True)
    values = {**data, "uuid": uuid.uuid4(), "source": _source(data["event_type"]),
              "secret": new_secret(), "url_key": ssrf.endpoint_key(data["url"])}
    with _db().cursor(row_factory=dict_row) as cur:
        cur.execute(
            "INSERT INTO subscriptions (uuid, event_type, entity_type, url, url_key, "
            "http_method, event_identifiers, include_relations, source, secret) VALUES "
            "(%(uuid)s, %(event_type)s, %(entity_type)s, %(url)s, %(url_key)s, %(http_method)s, "
            "%(event_identifiers)s, %(include_relations)s, %(source)s, %(secret)s) "
            f"ON CONFLICT DO NOTHING RETURNING {_COLUMNS}, secret", values)
        row = cur.fetchone()
    if row is None:  # created by a concurrent request since _check_url looked
        raise _taken()
    _audit("created", row)
    return _json(_out(row, _CREATED), 201)


@bp.get("/<webhook_uuid>")
def show_webhook(webhook_uuid: str) -> Response:
    key = _uuid(webhook_uuid)
    row = _fetch(key)
    if row is None:
        raise _not_found(key)
    return _json(_out(row))


@bp.put("/<webhook_uuid>")
def update_webhook(webhook_uuid: str) -> Response:
    key = _uuid(webhook_uuid)
    current = _fetch(key)
    if current is None:
        raise _not_found(key)
    data = _input()
    # its own endpoint and event type again: no clash to look for, and its key is kept (one
    # made before keys existed may share its endpoint with an older one: see migration 0008)
    kept = data["event_type"] == current["event_type"] and _same_endpoint(data["url"],
                                                                         current["url"])
    _check_url(data["url"], data["event_type"], moved=data["url"] != current["url"], own=key,
               unique=not kept)
    # a PUT re-activates a suspended subscription (RD's way to say "try my URL again")
    try:
        with _db().cursor(row_factory=dict_row) as cur:
            cur.execute(
                "UPDATE subscriptions SET event_type = %(event_type)s, "
                "entity_type = %(entity_type)s, url = %(url)s, "
                "url_key = CASE WHEN %(kept)s THEN url_key ELSE %(url_key)s END, "
                "http_method = %(http_method)s, "
                "event_identifiers = %(event_identifiers)s, "
                "include_relations = %(include_relations)s, source = %(source)s, "
                "status = 'active', consecutive_failures = 0, suspended_at = NULL, "
                "failing_since = NULL, "
                "updated_at = now() "
                f"WHERE uuid = %(uuid)s RETURNING {_COLUMNS}",
                {**data, "uuid": key, "source": _source(data["event_type"]),
                 "url_key": ssrf.endpoint_key(data["url"]), "kept": kept})
            row = cur.fetchone()
    except psycopg.errors.UniqueViolation:
        raise _taken() from None
    if row is None:
        raise _not_found(key)
    _audit("updated", row)
    return _json(_out(row))


def _same_endpoint(url: str, stored: str) -> bool:
    try:
        return ssrf.endpoint_key(url) == ssrf.endpoint_key(stored)
    except (ssrf.Refused, ValueError):  # a stored URL today's checks would refuse
        return False


@bp.delete("/<webhook_uuid>")
def delete_webhook(webhook_uuid: str) -> Response:
    key = _uuid(webhook_uuid)
    with _db().cursor(row_factory=dict_row) as cur:
        cur.execute("DELETE FROM subscriptions WHERE uuid = %s RETURNING uuid, event_type, url",
                    (key,))
        row = cur.fetchone()
    if row is None:
        raise _not_found(key)
    _audit("deleted", row)
    response = Response(status=204)
    del response.headers["Content-Type"]
    return response


# A rotation within an earlier one's grace (a retried call whose answer was lost, two
# rotations in a day) keeps each old secret signing until its own grace ends: the receiver may
# still be on any of them. SET reads the row as it was: the previous secret, still in its
# grace, joins the older ones; the latest OLDER_SECRETS_KEPT to expire are kept.
OLDER_SECRETS_KEPT = 4
_ROTATE_SQL = """
    UPDATE subscriptions SET
        older_secrets = COALESCE((
            SELECT jsonb_agg(o) FROM (
                SELECT o FROM jsonb_array_elements(older_secrets || CASE
                    WHEN previous_secret IS NOT NULL AND previous_secret_expires_at > now()
                    THEN jsonb_build_array(jsonb_build_object(
                        'secret', previous_secret, 'expires_at', previous_secret_expires_at))
                    ELSE '[]'::jsonb END) AS t(o)
                WHERE (o->>'expires_at')::timestamptz > now()
                ORDER BY (o->>'expires_at')::timestamptz DESC LIMIT %(kept)s) AS kept), '[]'),
        previous_secret = secret, secret = %(secret)s,
        previous_secret_expires_at = now() + make_interval(secs => %(grace)s),
        updated_at = now()
    WHERE uuid = %(uuid)s
    RETURNING uuid, event_type, url, secret, previous_secret_expires_at
"""


@bp.post("/<webhook_uuid>/secret/rotate")
def rotate_secret(webhook_uuid: str) -> Response:
    """A new signing secret, shown once; the old one also signs until the grace period ends
    (LEADPIPE_SUBSCRIPTION_SECRET_GRACE_SECONDS), so the receiver can switch without a gap,
    and so do older ones whose grace has not ended (_ROTATE_SQL)."""
    key = _uuid(webhook_uuid)
    grace = _option("subscription_secret_grace_seconds", 24 * 3600)
    with _db().cursor(row_factory=dict_row) as cur:
        cur.execute(_ROTATE_SQL, {"secret": new_secret(), "grace": grace, "uuid": key,
                                  "kept": OLDER_SECRETS_KEPT})
        row = cur.fetchone()
    if row is None:
        raise _not_found(key)
    _audit("secret rotated", row)
    return _json(_ROTATED.dump(row))
