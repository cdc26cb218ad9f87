"""POST /webhooks/rdstation: every answer, and what reaches the Redis stream."""

from __future__ import annotations

import orjson
import pytest
import requests

from config.local import free_port
from ingest import create_app
from tests.conftest import OTHER_TOKEN, TOKEN, ApiProcess, fixture_bytes, post

CONVERTED = fixture_bytes("mkt-v2-converted.json")


def rd_error(response, status: int, error_type: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    body = orjson.loads(response.data)
    assert set(body) == {"errors"}
    assert body["errors"]["error_type"] == error_type
    assert isinstance(body["errors"]["error_message"], str) and body["errors"]["error_message"]


def stream_len(redis_client, settings) -> int:  # type: ignore[no-untyped-def]
    return redis_client.xlen(settings.stream_key)


def test_accepted_body_is_on_the_stream_byte_for_byte(client, redis_client, settings):
    response = post(client, CONVERTED)
    assert response.status_code == 202
    event_id = response.get_json()["id"]
    entries = redis_client.xrange(settings.stream_key)
    assert len(entries) == 1
    fields = entries[0][1]
    assert fields[b"i"].decode() == event_id
    assert fields[b"b"] == CONVERTED
    assert int(fields[b"t"]) > 0


@pytest.mark.parametrize("token", [TOKEN, OTHER_TOKEN])
def test_every_configured_token_is_accepted_for_rotation(client, token):
    assert post(client, CONVERTED, token=token).status_code == 202


def test_token_in_configured_header(client, settings):
    response = client.post("/webhooks/rdstation", data=CONVERTED, content_type="application/json",
                           headers={settings.ingest_token_header: TOKEN})
    assert response.status_code == 202


@pytest.mark.parametrize("url", ["/webhooks/rdstation", "/webhooks/rdstation?token=wrong",
                                 f"/webhooks/rdstation?token={TOKEN}x",
                                 "/webhooks/rdstation?token="])
def test_unauthenticated_is_401_and_nothing_enqueued(client, redis_client, settings, url):
    response = client.post(url, data=CONVERTED, content_type="application/json")
    rd_error(response, 401, "UNAUTHORIZED")
    assert stream_len(redis_client, settings) == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_non_json_content_type_is_415(client, redis_client, settings, content_type):
    rd_error(post(client, CONVERTED, content_type=content_type), 415, "UNSUPPORTED_MEDIA_TYPE")
    assert stream_len(redis_client, settings) == 0


def test_json_with_charset_is_accepted(client):
    assert post(client, CONVERTED, content_type="application/json; charset=utf-8"
                ).status_code == 202


def test_body_over_limit_is_413(redis_url, database_url, redis_client, settings):
    app = create_app(settings.with_(max_body_bytes=1000))
    client = app.test_client()
    big = b'{"event_type": "WEBHOOK.CONVERTED", "pad": "' + b"x" * 2000 + b'"}'
    rd_error(post(client, big), 413, "PAYLOAD_TOO_LARGE")
    assert post(client, CONVERTED[:999] if len(CONVERTED) < 1000 else b'{"a": 1}'
                ).status_code in (202, 400)
    assert stream_len(redis_client, settings) <= 1


@pytest.mark.parametrize("server", ["granian", "gunicorn"])
def test_chunked_body_over_limit_is_413_on_a_real_server(settings, redis_client, tmp_path,
                                                         server):
    live_api = ApiProcess(settings, tmp_path / "api.log", server=server)
    try:
        chunked_checks(settings, redis_client, live_api)
    finally:
        live_api.stop()


def chunked_checks(settings, redis_client, live_api):  # type: ignore[no-untyped-def]
    def chunks():  # no Content-Length: the size is only known while reading
        yield b'{"pad": "'
        for _ in range(int(settings.max_body_bytes / 1000) + 10):
            yield b"x" * 1000
        yield b'"}'

    response = requests.post(f"{live_api.url}/webhooks/rdstation?token={TOKEN}", data=chunks(),
                             headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 413
    assert response.json()["errors"]["error_type"] == "PAYLOAD_TOO_LARGE"
    small = requests.post(f"{live_api.url}/webhooks/rdstation?token={TOKEN}",
                          data=iter([CONVERTED[:100], CONVERTED[100:]]),
                          headers={"Content-Type": "application/json"}, timeout=10)
    assert small.status_code == 202
    assert stream_len(redis_client, settings) == 1


@pytest.mark.parametrize("body", [b"{not json", b'{"a": 1', b"\xff\xfe{}", b'{"a": "\xc3"}',
                                  b"nul\x00l", b'{"a": NaN}', b'{"a": Infinity}',
                                  b'{"a": [-Infinity], "n": 123456789012345678901234567890}'])
def test_invalid_json_is_400(client, redis_client, settings, body):
    rd_error(post(client, body), 400, "BAD_REQUEST")
    assert stream_len(redis_client, settings) == 0


@pytest.mark.parametrize("body", [b"[]", b"[{}]", b'"text"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_is_400(client, redis_client, settings, body):
    rd_error(post(client, body), 400, "BAD_REQUEST")
    assert stream_len(redis_client, settings) == 0


@pytest.mark.parametrize("body", [b"", b"{}", b"  { }  ", b"\n"])
def test_probe_is_200_and_nothing_enqueued(client, redis_client, settings, body):
    response = post(client, body)
    assert response.status_code == 200
    assert stream_len(redis_client, settings) == 0


def test_integers_past_64_bits_are_valid_json(client, redis_client, settings):
    body = b'{"event_name": "crm_deal_updated", "n": 123456789012345678901234567890}'
    assert post(client, body).status_code == 202
    assert redis_client.xrange(settings.stream_key)[0][1][b"b"] == body


def test_event_type_hint_is_kept_and_checked(client, redis_client, settings):
    legacy = fixture_bytes("legacy-leads-full.json")
    ok = client.post(f"/webhooks/rdstation?token={TOKEN}&event_type=WEBHOOK.MARKED_OPPORTUNITY",
                     data=legacy, content_type="application/json")
    assert ok.status_code == 202
    assert redis_client.xrange(settings.stream_key)[0][1][b"h"] == b"WEBHOOK.MARKED_OPPORTUNITY"
    bad = client.post(f"/webhooks/rdstation?token={TOKEN}&event_type=DROP",
                      data=legacy, content_type="application/json")
    rd_error(bad, 400, "INVALID")


def test_redis_unreachable_is_503_with_retry_after(settings):
    down = settings.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0",
                          redis_timeout_seconds=0.5)
    client = create_app(down).test_client()
    response = post(client, CONVERTED)
    rd_error(response, 503, "SERVICE_UNAVAILABLE")
    assert response.headers["Retry-After"] == str(settings.retry_after_seconds)


def test_unknown_url_and_wrong_method_are_rd_shaped(client):
    rd_error(client.get("/nope"), 404, "RESOURCE_NOT_FOUND")
    rd_error(client.get(f"/webhooks/rdstation?token={TOKEN}"), 405, "METHOD_NOT_ALLOWED")


def test_health_needs_no_token_and_reveals_nothing(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_an_unexpected_error_is_a_json_500_logged_without_its_message(settings, monkeypatch,
                                                                      caplog):
    """A bug on the request path: RD gets a JSON 500 (and sends again), the log gets the
    error's type and frames, its own and those it was raised from, never its text, which
    may quote the lead."""
    from ingest import views

    name = orjson.loads(CONVERTED)["contact"]["name"]  # (frames show source lines: not it)

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            raise KeyError(name)
        except KeyError as exc:
            raise RuntimeError(f"while storing {name}") from exc

    monkeypatch.setattr(views, "store", broken)
    client = create_app(settings.with_(ingest_fast_path=False)).test_client()
    response = post(client, CONVERTED)
    rd_error(response, 500, "INTERNAL_ERROR")
    assert "unexpected error: RuntimeError" in caplog.text
    assert "KeyError:" in caplog.text and "in broken" in caplog.text  # the cause's frames
    assert name not in caplog.text and name not in response.get_data(as_text=True)
