"""GET /openapi.json: the subscription API described by the marshmallow schemas that validate it."""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Response

from ingest import subscription_schemas as schemas
from ingest.subscriptions import guard

bp = Blueprint("openapi", __name__)
guard(bp)  # the subscription API's token check, and its 503s when the database is unavailable

BASE = "/integrations/webhooks"


def _body(description: str, schema: str, **extra: Any) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema}}, **extra}


def _responses(codes: dict[str, Any]) -> dict[str, Any]:
    """`responses` of an operation, with the 401 and 503 every one can answer.

    Fresh dicts every time: apispec resolves schema names in place."""
    unauthorized = _body(
        "No valid API token; or (create, update to a new URL) the URL did not answer the "
        "check, a POST of {}, with a 2xx within 5 s.", "Error",
        headers={"WWW-Authenticate": {"description": "The Bearer challenge (token problems).",
                                      "schema": {"type": "string"}}})
    unavailable = _body("The database is unavailable; retry later.", "Error",
                        headers={"Retry-After": {"schema": {"type": "integer"}}})
    return {**codes, "401": unauthorized, "503": unavailable}


def _not_found() -> dict[str, Any]:
    return _body("No webhook with this uuid.", "Error")


def _bad_body() -> dict[str, Any]:
    return {
        "400": _body("The body is not JSON, or not a JSON object.", "Error"),
        "413": _body("The body is larger than LEADPIPE_MAX_BODY_BYTES.", "Error"),
        "415": _body("Content-Type is not application/json.", "Error"),
        "422": _body("Invalid fields; the url already taken for this event_type (TAKEN); or "
                      "a url that does not reach a public address.", "FieldErrors"),
    }


def _links() -> dict[str, Any]:
    """What a client can do next with the uuid a create answered (schemathesis follows these)."""
    uuid = {"uuid": "$response.body#/uuid"}
    return {name: {"operationId": operation, "parameters": dict(uuid)}
            for name, operation in (("ShowWebhook", "showWebhook"),
                                    ("UpdateWebhook", "updateWebhook"),
                                    ("DeleteWebhook", "deleteWebhook"))}


def _input() -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": "WebhookInput"}}}


@cache
def document() -> dict[str, Any]:
    """The OpenAPI 3 document (built once per process)."""
    spec = APISpec(
        title="Leadpipe webhook subscriptions", version="1.0.0", openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "RD Station-compatible subscription API (/integrations/webhooks)."},
        security=[{"bearer": []}],
    )
    spec.components.security_scheme("bearer", {
        "type": "http", "scheme": "bearer",
        "description": "An API token from `leadpipe tokens create NAME`."})
    for name, schema in (("WebhookInput", schemas.WebhookInputSchema),
                         ("Webhook", schemas.WebhookSchema),
                         ("CreatedWebhook", schemas.CreatedWebhookSchema),
                         ("WebhookList", schemas.WebhookListSchema),
                         ("RotatedSecret", schemas.RotatedSecretSchema),
                         ("ErrorDetail", schemas.ErrorDetailSchema),
                         ("Error", schemas.ErrorSchema),
                         ("FieldErrors", schemas.FieldErrorsSchema)):
        spec.components.schema(name, schema=schema)
    spec.path(path=BASE, operations={
        "get": {"operationId": "listWebhooks", "summary": "List every subscription.",
                "responses": _responses({
                    "200": _body("All subscriptions (no pagination).", "WebhookList")})},
        "post": {"operationId": "createWebhook", "summary": "Subscribe a URL to an event.",
                 "requestBody": _input(),
                 "responses": _responses({
                     "201": _body("Created; `secret` is shown only here.", "CreatedWebhook",
                                  links=_links()),
                     **_bad_body()})},
    })
    uuid = {"name": "uuid", "in": "path", "required": True,
            "schema": {"type": "string", "format": "uuid"}}
    spec.path(path=BASE + "/{uuid}", parameters=[uuid], operations={
        "get": {"operationId": "showWebhook", "summary": "One subscription.",
                "responses": _responses({"200": _body("The subscription.", "Webhook"),
                                         "404": _not_found()})},
        "put": {"operationId": "updateWebhook",
                "summary": "Replace a subscription (all required fields again); re-activates "
                           "a suspended one.",
                "requestBody": _input(),
                "responses": _responses({"200": _body("The subscription as updated.", "Webhook"),
                                         "404": _not_found(), **_bad_body()})},
        "delete": {"operationId": "deleteWebhook", "summary": "Unsubscribe.",
                   "responses": _responses({"204": {"description": "Deleted."},
                                            "404": _not_found()})},
    })
    spec.path(path=BASE + "/{uuid}/secret/rotate", parameters=[uuid], operations={
        "post": {"operationId": "rotateWebhookSecret",
                 "summary": "A new signing secret (Leadpipe's addition; RD signs nothing). The "
                            "old one keeps signing during the grace period.",
                 "responses": _responses({"200": _body("The new secret, shown only here.",
                                                       "RotatedSecret"),
                                          "404": _not_found()})},
    })
    return spec.to_dict()


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return Response(orjson.dumps(document()), mimetype="application/json")
