"""The operator API refuses input its stores cannot take with a 400, never a 500."""

from __future__ import annotations

import pytest

from ingest import create_app

ADMIN = "operator-input-admin-token"
BIG = "99999999999999999999"  # past Postgres' bigint

REFUSED = [
    ("GET", "/api/dead-letters?limit=%C2%B2", None),  # "²": a digit to str.isdigit, not to int
    ("GET", "/api/dead-letters?limit=%D9%A3", None),  # "٣" (Arabic-Indic 3)
    ("GET", "/api/dead-letters?limit=" + "9" * 5000, None),
    ("GET", "/api/dead-letters?sink=a%00b", None),
    ("GET", "/api/quarantine?limit=%C2%B2", None),
    ("GET", "/api/workers?timeout=nan", None),
    ("GET", "/api/workers?timeout=inf", None),
    ("POST", f"/api/dead-letters/{BIG}/replay", None),
    ("POST", "/api/dead-letters/%C2%B2/replay", None),
    ("POST", "/api/dead-letters/replay", {"sink": "a\u0000b"}),
    ("POST", "/api/dead-letters/replay", {"sink": "\ud800"}),  # a lone surrogate
    ("POST", "/api/reveal", {"kind": "dead_letter", "id": BIG}),
    ("POST", "/api/reveal", {"kind": "dead_letter", "id": int(BIG)}),
    ("POST", "/api/reveal", {"kind": "dead_letter", "id": "\u00b2"}),
    ("POST", "/api/reveal", {"kind": "quarantine", "id": "a\u0000b"}),
    ("POST", "/api/reveal", {"kind": [], "id": 1}),
    ("POST", "/api/erase", {"email": "a\u0000@b.c"}),
    ("POST", "/api/erase", {"email": "\ud800@b.c"}),
]


@pytest.fixture
def operator(settings, tmp_path):  # type: ignore[no-untyped-def]
    routes = tmp_path / "routes.yaml"  # one sink, "audit", that the replays below may name
    routes.write_text("sinks: {audit: {type: dummy, options: {path: x}}}\n"
                      "routes: [{to: [audit]}]\n")
    app = create_app(settings.with_(admin_tokens=(ADMIN,), routes_file=str(routes)))
    return app.test_client()


def call(client, method: str, path: str, body):  # type: ignore[no-untyped-def]
    return client.open(path, method=method, json=body,
                       headers={"Authorization": f"Bearer {ADMIN}"})


def case_id(case: tuple) -> str:  # type: ignore[type-arg]
    method, path, body = case
    return ascii(f"{method} {path[:60]} {body or ''}")


@pytest.mark.parametrize(("method", "path", "body"), REFUSED, ids=[case_id(c) for c in REFUSED])
def test_input_a_store_cannot_take_is_a_400(operator, method, path, body):
    answer = call(operator, method, path, body)
    assert answer.status_code == 400, answer.data
    errors = answer.get_json()["errors"]
    assert errors["error_type"] == "INVALID" and errors["error_message"]


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("GET", "/api/dead-letters?limit=5&sink=audit", None, 200),
    ("GET", "/api/quarantine?limit=500", None, 200),
    ("GET", "/api/workers?timeout=0.1", None, 200),
    ("POST", "/api/dead-letters/9223372036854775807/replay", None, 404),
    ("POST", "/api/dead-letters/replay", {"sink": "audit"}, 200),
    ("POST", "/api/reveal", {"kind": "dead_letter", "id": "9223372036854775807"}, 404),
    ("POST", "/api/reveal", {"kind": "dead_letter", "id": 12}, 404),
    ("POST", "/api/reveal", {"kind": "quarantine", "id": "01HZY"}, 404),
])
def test_valid_input_still_goes_through(operator, method, path, body, status):
    answer = call(operator, method, path, body)
    assert answer.status_code == status, answer.data


@pytest.mark.parametrize("path", ["/api/dead-letters/replay", "/api/erase", "/api/reveal"])
def test_json_nested_too_deep_to_parse_is_a_400_and_logs_no_traceback(operator, path, caplog):
    deep = b"[" * 100_000 + b"]" * 100_000  # the parser's RecursionError, not a ValueError
    answer = operator.post(path, data=deep, content_type="application/json",
                           headers={"Authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 400, answer.data
    assert answer.get_json()["errors"]["error_type"] == "INVALID"
    assert not [r for r in caplog.records if r.exc_info or "unexpected" in r.getMessage()]
