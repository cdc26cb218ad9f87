"""Property-based: any JSON value in any field of any dialect is an event or a quarantine row."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.queue import Entry
from tests.conftest import count, fixture_bytes
from workers import pipeline
from workers.events import Event, Rejected
from workers.normalize import normalize

FIXTURES = ("mkt-v2-converted.json", "mkt-v2-marked-opportunity.json", "legacy-leads-full.json",
            "legacy-leads-official.json", "crm-deal-created.json", "crm-deal-updated-won.json",
            "crm-deal-deleted.json")

# Any JSON value, including what real deliveries and attackers send: huge and negative
# integers, floats, NUL and lone-surrogate-free odd text, empty and nested containers.
scalars = (st.none() | st.booleans()
           | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=30)
           | st.sampled_from(["", "true", "3", "2025-13-45", "2025-03-10T10:14:58.901-03:00",
                              "\u0000", "null", "NaN", "-0", "1e999"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=12)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document a value can be put (object keys and list items)."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            found.append((*prefix, key))
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for n, item in enumerate(value):
            found.append((*prefix, n))
            found += paths(item, (*prefix, n))
    return found


def replaced(doc: Any, path: tuple, value: Any) -> Any:
    out = copy.deepcopy(doc)
    target = out
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return out


@st.composite
def mutated_bodies(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A fixture with one to three fields (anywhere, at any depth) set to any JSON value."""
    doc = orjson.loads(fixture_bytes(draw(st.sampled_from(FIXTURES))))
    for _ in range(draw(st.integers(1, 3))):
        where = paths(doc)
        if not where:
            break
        doc = replaced(doc, draw(st.sampled_from(where)), draw(json_values))
    hint = draw(st.sampled_from([None, "WEBHOOK.CONVERTED", "WEBHOOK.MARKED_OPPORTUNITY"]))
    # the standard library's encoder: orjson refuses integers past 64 bits, RD's bodies don't
    import json

    return json.dumps(doc).encode(), hint


def entry(body: bytes, hint: str | None, n: int = 0) -> Entry:
    return Entry(f"{n}-0", f"prop-{n}", 1_700_000_000_000, body, hint)


# Health checks judge how efficiently examples are generated (slow on a loaded machine, large
# documents), not the code under test: they are off so they cannot fail a run.
@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_bodies())
def test_any_value_in_any_field_is_an_event_or_a_quarantine(case):
    body, hint = case
    items = normalize(entry(body, hint))
    assert items, "nothing came out: a body must never vanish"
    for item in items:
        assert isinstance(item, Event | Rejected)
        if isinstance(item, Rejected):
            assert item.reason  # says why
        else:
            assert item.dedup_key and item.event_type and item.occurred_at.tzinfo is not None


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(json_values, st.dictionaries(st.text(max_size=12), json_values, max_size=6)))
def test_any_json_document_at_all_is_an_event_or_a_quarantine(doc):
    import json

    items = normalize(entry(json.dumps(doc).encode(), None))
    assert items and all(isinstance(item, Event | Rejected) for item in items)


# psycopg_pool gives each new connection a jittered lifetime with the global `random`, from
# its own background thread: when that lands while Hypothesis draws a batch, Hypothesis takes
# it for the strategy's own use of `random` (the strategies here use none) and fails the run
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies:"
    "hypothesis.errors.HypothesisDeprecationWarning")
def test_mutated_batches_are_stored_whole_in_postgres(runtime, db):
    """The batch path (normalise, then Postgres) over batches of mutated bodies: every event is
    in `events` (by its dedup key: a repeat finds the first) and every rejection in
    `quarantine`; nothing escapes the batch, nothing is lost."""
    numbers = iter(range(10**6))

    @settings(max_examples=60, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(mutated_bodies(), min_size=1, max_size=8))
    def batch(cases: list[tuple[bytes, str | None]]) -> None:
        entries = [entry(body, hint, next(numbers)) for body, hint in cases]
        events, rejected = pipeline.split(entries)
        pipeline.store(runtime, events, rejected)
        # an event Postgres refuses (say, a date past year 9999) is quarantined in its place
        refused = {i for (i,) in db.execute("SELECT id FROM quarantine WHERE id = ANY(%s)",
                                             ([e.id for e in events],))}
        keys = sorted({e.dedup_key for e in events if e.id not in refused})
        assert count(db, "SELECT count(*) FROM events WHERE dedup_key = ANY(%s)",
                     keys) == len(keys)
        ids = [r.id for r in rejected]
        assert count(db, "SELECT count(*) FROM quarantine WHERE id = ANY(%s)", ids) == len(ids)

    batch()
