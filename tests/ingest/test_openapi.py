"""/openapi.json: a valid OpenAPI 3 document of the subscription API, and a live server that
keeps to it under schemathesis (no 5xx, every answer as documented)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from werkzeug.serving import make_server

from config.local import free_port
from ingest import subscription_schemas as schemas
from ingest import tokens
from ingest.openapi import document
from tests.ingest.test_subscriptions import BIG_ACCOUNT, api_client, subscription_app
from tests.ingest.test_subscriptions import subscription_settings as with_options

MAX_EXAMPLES = 30  # per operation and phase: the whole run stays well under a minute


@pytest.fixture
def api_token(database_url: str) -> str:
    return tokens.create(database_url, "schemathesis")


def test_document_is_valid_openapi_3_and_needs_a_token(settings, api_token):
    client = api_client(settings, api_token)
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    spec = response.get_json()
    validate(spec)
    assert spec["openapi"].startswith("3.")
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]
        ["bearer"]["description"]}
    operations = {(method, path) for path, ops in spec["paths"].items() for method in ops
                  if method != "parameters"}
    assert operations == {("get", "/integrations/webhooks"), ("post", "/integrations/webhooks"),
                          ("get", "/integrations/webhooks/{uuid}"),
                          ("put", "/integrations/webhooks/{uuid}"),
                          ("delete", "/integrations/webhooks/{uuid}"),
                          ("post", "/integrations/webhooks/{uuid}/secret/rotate")}
    del client.environ_base["HTTP_AUTHORIZATION"]
    assert client.get("/openapi.json").status_code == 401


@pytest.mark.parametrize("database", ["down", "none"])
def test_document_answers_503_like_the_api_when_the_database_is_unavailable(settings, api_token,
                                                                            database, caplog):
    # the token check needs Postgres: without it, /openapi.json answers as the API does
    url = None if database == "none" else f"postgresql://leadpipe@127.0.0.1:{free_port()}/none"
    client = api_client(settings.with_(database_url=url), api_token)
    answers = [client.get(path) for path in ("/openapi.json", "/integrations/webhooks")]
    for response in answers:
        assert response.status_code == 503 and response.mimetype == "application/json"
        assert response.get_json()["errors"]["error_type"] == "SERVICE_UNAVAILABLE"
    document_answer, api_answer = answers
    assert document_answer.data == api_answer.data
    assert document_answer.headers.get("Retry-After") == api_answer.headers.get("Retry-After")
    if database == "down":
        assert document_answer.headers["Retry-After"] == "5"
    assert not [r for r in caplog.records if r.exc_info]  # no traceback: not a 500


def test_document_comes_from_the_validating_schemas():
    components = document()["components"]["schemas"]
    webhook_input = components["WebhookInput"]["properties"]
    assert webhook_input["event_type"]["enum"] == list(schemas.EVENT_TYPES)
    assert webhook_input["entity_type"]["enum"] == ["CONTACT"]
    assert webhook_input["http_method"]["enum"] == ["POST"]
    assert webhook_input["include_relations"]["items"]["enum"] == list(schemas.RELATIONS)
    assert webhook_input["url"]["maxLength"] == schemas.MAX_URL
    assert sorted(components["WebhookInput"]["required"]) == [
        "entity_type", "event_type", "http_method", "url"]
    webhook = components["Webhook"]
    assert set(webhook["properties"]) == set(webhook["required"]) == set(webhook_input) | {
        "uuid", "created_at", "updated_at", "status", "source", "platform_account_id"}
    assert "secret" not in webhook["properties"]
    assert "secret" in components["CreatedWebhook"]["required"]
    assert components["FieldErrors"]["properties"]["errors"]["additionalProperties"]["items"] == {
        "$ref": "#/components/schemas/ErrorDetail"}


# -- schemathesis against a live HTTP server ---------------------------------------------------


@pytest.fixture
def live_url(settings, api_token) -> Iterator[str]:
    """The app served over real HTTP by werkzeug in a thread (probe off; example.com, the
    documented example host, admitted without DNS so valid bodies can succeed)."""
    app = subscription_app(with_options(settings, platform_account_id=BIG_ACCOUNT,
                                        subscription_probe=False, ssrf_allow=("example.com",)))
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def auth(api_token) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_token}"}


# Every default check, with two adjustments:
# - RD's contract answers some schema-valid bodies with 422: a url already subscribed for the
#   event_type (TAKEN) or one that does not reach a public address (the SSRF guard);
# - 405's Allow header: ingest/errors.py turns every HTTPException into RD's JSON error and
#   drops the headers Werkzeug gave it (Allow included): to be fixed there, then re-enabled.
CHECKS = schemathesis.Config.from_dict({"checks": {
    "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "404", "422"]},
}})


@pytest.fixture
def live_schema(live_url, auth):  # type: ignore[no-untyped-def]
    return schemathesis.openapi.from_url(live_url + "/openapi.json", headers=auth, timeout=10,
                                         config=CHECKS)


schema = schemathesis.pytest.from_fixture("live_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_live_server_keeps_to_its_openapi_document(case, live_url, auth):
    response = case.call_and_validate(base_url=live_url, headers=auth, timeout=10)
    assert response.status_code < 500


def test_live_server_keeps_to_it_through_create_show_update_delete(live_schema, live_url, auth,
                                                                    db):
    """Stateful: schemathesis follows the document's links from a create to the new uuid."""

    class Scenario(live_schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            # every scenario from an empty table, so that Hypothesis can replay one exactly
            db.execute("TRUNCATE subscriptions")

        def before_call(self, case):  # type: ignore[no-untyped-def]
            # generated hosts do not resolve here (no DNS): move http(s) URLs onto the admitted
            # host, the old host becoming the path, so creates succeed and differ
            url = case.body.get("url") if isinstance(case.body, dict) else None
            if isinstance(url, str) and re.match(r"https?://[^/?#]+", url):
                case.body["url"] = re.sub(r"^(https?)://", r"\1://example.com/", url)

        def get_call_kwargs(self, case):  # type: ignore[no-untyped-def]
            return {"base_url": live_url, "headers": auth, "timeout": 10}

    Scenario.run(settings=settings(max_examples=MAX_EXAMPLES, stateful_step_count=6,
                                   deadline=None, database=None,
                                   suppress_health_check=list(HealthCheck)))


def test_live_server_really_creates_from_the_documented_example(live_url, auth):
    body = {"event_type": "WEBHOOK.CONVERTED", "entity_type": "CONTACT",
            "url": document()["components"]["schemas"]["WebhookInput"]["properties"]["url"]
            ["example"], "http_method": "POST"}
    created = requests.post(live_url + "/integrations/webhooks", json=body, headers=auth,
                            timeout=10)
    assert created.status_code == 201, created.text
    assert b'"platform_account_id":9007199254740993' in created.content
