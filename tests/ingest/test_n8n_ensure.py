"""The official n8n RD Station Marketing trigger's "ensure" flow, run against Leadpipe.

`N8nTrigger` behaves as that node does when a workflow is activated: `check_exists` (the stored
subscription, else one in the list matching in full, lists compared as unordered sets), then
`create` (list, match on url + event_type only, PUT when found, POST otherwise; empty lists are
left out of the body), and `delete` on deactivation. Its subscriber URL is a real local server
that answers Leadpipe's probe.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from ingest import tokens
from tests.ingest.test_subscriptions import HOOKS, api_client
from tests.support.http_server import HttpServer


class N8nTrigger:
    """One trigger node: its parameters, its static data, and the HTTP calls it makes."""

    def __init__(self, client: Any, webhook_url: str, event: str = "WEBHOOK.CONVERTED",
                 identifiers: list[str] | None = None, relations: list[str] | None = None):
        self.client = client
        self.webhook_url = webhook_url
        self.event = event
        self.identifiers = identifiers or []
        self.relations = relations or []
        self.static: dict[str, str] = {}  # n8n keeps the subscription's uuid here
        self.calls: list[str] = []

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        self.calls.append(method)
        response = self.client.open(path, method=method, json=body,
                                    headers={"Accept": "application/json"})
        assert response.status_code < 300, (method, path, response.status_code, response.data)
        return response.get_json(silent=True)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"event_type": self.event, "entity_type": "CONTACT",
                                "url": self.webhook_url, "http_method": "POST"}
        identifiers = list(dict.fromkeys(i.strip() for i in self.identifiers if i.strip()))
        if self.event == "WEBHOOK.CONVERTED" and identifiers:
            body["event_identifiers"] = identifiers
        relations = [r for r in dict.fromkeys(self.relations) if r in ("COMPANY", "CONTACT_FUNNEL")]
        if relations:
            body["include_relations"] = relations
        return body

    @staticmethod
    def _same_set(left: Any, right: Any) -> bool:
        def normal(value: Any) -> list[str]:
            return sorted(str(v).strip() for v in value or [] if str(v).strip())
        return normal(left) == normal(right)

    @staticmethod
    def _same_url_and_event(hook: dict, body: dict) -> bool:
        return hook.get("url") == body["url"] and hook.get("event_type") == body["event_type"]

    def _matches(self, hook: dict, body: dict) -> bool:
        return (self._same_url_and_event(hook, body)
                and hook.get("entity_type") == body["entity_type"]
                and hook.get("http_method") == body["http_method"]
                and self._same_set(hook.get("event_identifiers"), body.get("event_identifiers"))
                and self._same_set(hook.get("include_relations"), body.get("include_relations")))

    def _find(self, body: dict, exact: bool) -> dict | None:
        for hook in self._call("GET", HOOKS).get("webhooks", []):
            if (self._matches(hook, body) if exact else self._same_url_and_event(hook, body)):
                return hook
        return None

    def check_exists(self) -> bool:
        body = self.body()
        stored = self.static.get("webhookId")
        if stored:
            response = self.client.get(f"{HOOKS}/{quote(stored)}")
            self.calls.append("GET")
            hook = response.get_json() if response.status_code == 200 else None
            if hook and self._matches(hook, body):
                return True
            if not hook or not self._same_url_and_event(hook, body):
                del self.static["webhookId"]
        found = self._find(body, exact=True)
        if not found:
            return False
        self.static["webhookId"] = found["uuid"]
        return True

    def create(self) -> dict:
        body = self.body()
        existing = self._find(body, exact=False)
        if existing:
            hook = self._call("PUT", f"{HOOKS}/{quote(existing['uuid'])}", body)
        else:
            hook = self._call("POST", HOOKS, body)
        self.static["webhookId"] = hook["uuid"]
        return hook

    def activate(self) -> str:
        """What n8n does on activation: nothing when the subscription exists, else create."""
        self.calls.clear()
        if self.check_exists():
            return "exists"
        self.create()
        return "updated" if self.calls[-1] == "PUT" else "created"

    def delete(self) -> None:
        stored = self.static.pop("webhookId", None)
        if stored:
            self._call("DELETE", f"{HOOKS}/{quote(stored)}")


@pytest.fixture
def n8n():  # type: ignore[no-untyped-def]
    """n8n's webhook endpoint: answers Leadpipe's probe with 200."""
    with HttpServer() as server:
        yield server


@pytest.fixture
def client(settings, database_url):  # type: ignore[no-untyped-def]
    """Leadpipe as n8n sees it: the probe on, 127.0.0.1 (the n8n server) admitted."""
    token = tokens.create(database_url, "n8n")
    return api_client(settings, token, subscription_probe=True, ssrf_allow=("127.0.0.1",))


def stored(client) -> list[dict]:  # type: ignore[no-untyped-def]
    return client.get(HOOKS).get_json()["webhooks"]


def test_ensure_twice_creates_then_updates_without_duplicates(client, n8n):
    url = n8n.url + "/webhook/rd-station-marketing"
    first = N8nTrigger(client, url, identifiers=["newsletter", "pricing"], relations=["COMPANY"])
    assert first.activate() == "created"
    assert first.calls == ["GET", "GET", "POST"]  # list (exact), list (url+event), create
    assert [r.body for r in n8n.requests] == [b"{}"]  # the probe
    (hook,) = stored(client)

    # the same workflow on another n8n instance (fresh static data), identifiers in another
    # order: found in the list as identical sets, nothing to do
    again = N8nTrigger(client, url, identifiers=["pricing", "newsletter"], relations=["COMPANY"])
    assert again.activate() == "exists" and again.static["webhookId"] == hook["uuid"]
    # create() run anyway (n8n does when checkExists failed transiently): a PUT, not a 2nd POST
    assert again.create()["uuid"] == hook["uuid"] and again.calls[-1] == "PUT"
    assert [h["uuid"] for h in stored(client)] == [hook["uuid"]]
    assert len(n8n.requests) == 1  # a PUT to the same URL is not probed again


def test_changed_identifiers_update_the_same_subscription(client, n8n):
    url = n8n.url + "/webhook/rd"
    trigger = N8nTrigger(client, url, identifiers=["newsletter"])
    trigger.activate()
    uuid = trigger.static["webhookId"]

    trigger.identifiers = ["newsletter", "webinar"]
    trigger.relations = ["CONTACT_FUNNEL", "COMPANY"]
    assert trigger.activate() == "updated"
    assert trigger.calls == ["GET", "GET", "GET", "PUT"]  # show, list (exact), list (url+event)
    (hook,) = stored(client)
    assert hook["uuid"] == uuid
    assert set(hook["event_identifiers"]) == {"newsletter", "webinar"}
    assert set(hook["include_relations"]) == {"COMPANY", "CONTACT_FUNNEL"}
    assert trigger.activate() == "exists" and trigger.calls == ["GET"]

    trigger.identifiers, trigger.relations = [], []  # left out of the body: PUT clears them
    assert trigger.activate() == "updated"
    (hook,) = stored(client)
    assert (hook["uuid"], hook["event_identifiers"], hook["include_relations"]) == (uuid, [], [])


def test_one_url_for_two_events_is_two_subscriptions(client, n8n):
    url = n8n.url + "/webhook/rd"
    converted = N8nTrigger(client, url, identifiers=["x"])
    opportunity = N8nTrigger(client, url, event="WEBHOOK.MARKED_OPPORTUNITY",
                             identifiers=["ignored for this event"])
    assert (converted.activate(), opportunity.activate()) == ("created", "created")
    assert (converted.activate(), opportunity.activate()) == ("exists", "exists")
    hooks = {h["event_type"]: h for h in stored(client)}
    assert set(hooks) == {"WEBHOOK.CONVERTED", "WEBHOOK.MARKED_OPPORTUNITY"}
    assert hooks["WEBHOOK.MARKED_OPPORTUNITY"]["event_identifiers"] == []

    opportunity.delete()
    assert [h["event_type"] for h in stored(client)] == ["WEBHOOK.CONVERTED"]
    assert opportunity.activate() == "created"  # its stored id is gone: created again


def test_a_subscription_deleted_elsewhere_is_recreated(client, n8n):
    trigger = N8nTrigger(client, n8n.url + "/webhook/rd")
    trigger.activate()
    client.delete(f"{HOOKS}/{trigger.static['webhookId']}")
    assert trigger.activate() == "created"
    assert len(stored(client)) == 1
