"""API tokens: `leadpipe tokens create|list|revoke`, stored hashed, refused once revoked."""

from __future__ import annotations

import argparse
import hashlib
import re

import pytest

from ingest import tokens
from tests.ingest.test_subscriptions import HOOKS, subscription_app, subscription_settings


def tokens_cli(*argv: str) -> int:
    """`leadpipe tokens ...` through the subcommand add_cli declares."""
    parser = argparse.ArgumentParser(prog="leadpipe")
    tokens.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tokens", *argv])
    return args.func(args)


@pytest.fixture
def env(database_url, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LEADPIPE_DATABASE_URL", database_url)
    return database_url


def test_create_prints_the_token_once_and_stores_only_its_hash(env, db, capsys):
    assert tokens_cli("create", "n8n production") == 0
    token = capsys.readouterr().out.strip()
    assert re.fullmatch(r"lp_[A-Za-z0-9_-]{32}", token)
    row = db.execute("SELECT name, token_hash, prefix, last_used_at, revoked_at "
                     "FROM api_tokens").fetchone()
    assert row == ("n8n production", hashlib.sha256(token.encode()).hexdigest(), token[:8],
                   None, None)
    everything = db.execute("SELECT t::text FROM api_tokens t").fetchone()[0]
    assert token not in everything and token[8:] not in everything


def test_list_shows_name_prefix_use_and_revocation(env, settings, capsys):
    first = tokens.create(env, "zapier")
    tokens.create(env, "n8n")
    assert tokens_cli("list") == 0
    out = capsys.readouterr().out
    assert re.search(rf"1  zapier\s+{re.escape(first[:8])}\.\.\.  created .*last used -  active",
                     out), out
    assert "n8n" in out

    client = subscription_app(subscription_settings(settings)).test_client()
    assert client.get(HOOKS, headers={"Authorization": f"Bearer {first}"}).status_code == 200
    listed = {row["name"]: row for row in tokens.list_tokens(env)}
    assert listed["zapier"]["last_used_at"] is not None
    assert listed["n8n"]["last_used_at"] is None

    assert tokens_cli("revoke", "1") == 0
    assert capsys.readouterr().out == "token 1: revoked\n"
    tokens_cli("list")
    assert re.search(r"1  zapier .* revoked \d{4}-", capsys.readouterr().out)


def test_revoked_token_is_refused_and_others_still_work(env, settings):
    kept, revoked = tokens.create(env, "kept"), tokens.create(env, "old")
    client = subscription_app(subscription_settings(settings)).test_client()

    def status(token: str) -> int:
        return client.get(HOOKS, headers={"Authorization": f"Bearer {token}"}).status_code

    assert status(revoked) == 200
    old_id = next(r["id"] for r in tokens.list_tokens(env) if r["name"] == "old")
    assert tokens.revoke(env, old_id) is True
    response = client.get(HOOKS, headers={"Authorization": f"Bearer {revoked}"})
    assert response.status_code == 401
    assert response.get_json() == {"errors": {"error_type": "UNAUTHORIZED",
                                              "error_message": "Invalid token."}}
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="leadpipe", error="invalid_token"'
    assert status(kept) == 200
    assert tokens.revoke(env, old_id) is False  # already revoked: nothing changes


def test_tokens_are_checked_in_full_not_by_prefix(env, settings):
    token = tokens.create(env, "ci")
    client = subscription_app(subscription_settings(settings)).test_client()
    for wrong in (token[:8], token[:-1], token + "x", token.upper()):
        assert client.get(HOOKS, headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
    assert client.get(HOOKS, headers={"Authorization": f"bearer {token}"}).status_code == 200


def test_cli_refuses_what_it_cannot_do(env, monkeypatch):
    with pytest.raises(LookupError, match="no API token with id 99"):
        tokens_cli("revoke", "99")
    with pytest.raises(ValueError, match="needs a NAME"):
        tokens_cli("create")
    with pytest.raises(ValueError, match="needs a token ID"):
        tokens_cli("revoke")
    for not_an_id in ("abc", "\u0663", "\u00b2", "0"):  # ARABIC-INDIC THREE is no 3 to us
        with pytest.raises(ValueError, match="A token ID"):
            tokens_cli("revoke", not_an_id)
    with pytest.raises(ValueError, match="needs a name"):
        tokens.create(env, "   ")
    monkeypatch.delenv("LEADPIPE_DATABASE_URL")
    with pytest.raises(ValueError, match="LEADPIPE_DATABASE_URL is not set"):
        tokens_cli("list")
