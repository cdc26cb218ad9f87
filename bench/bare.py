"""The baseline of bench.ingest: a bare Flask app on the same path that does no work at all.

It answers POST /webhooks/rdstation with 202 and a tiny JSON body without reading the request,
checking a token or touching Redis, so `ours / bare` shows what Leadpipe's own work costs under
the same server, worker count and load.
"""

from __future__ import annotations

from flask import Flask, Response

_ACCEPTED = b'{"id":"bare"}'


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/webhooks/rdstation")
    def receive() -> Response:
        return Response(_ACCEPTED, status=202, mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b'{"status":"ok"}', mimetype="application/json")

    return app
