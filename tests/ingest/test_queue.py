"""The ingest stream: a batch's entries are found however the stream around them looks."""

from __future__ import annotations

import pytest

from ingest.queue import IngestStream, new_event_id


@pytest.fixture
def stream(redis_client, settings) -> IngestStream:
    return IngestStream(redis_client, settings.stream_key)


def append(stream: IngestStream, n: int) -> list[str]:
    ids = []
    for i in range(n):
        ids.append(stream.client.xadd(stream.key, {"i": new_event_id(), "t": i,
                                                    "b": b'{"n": %d}' % i}).decode())
    return ids


@pytest.mark.parametrize("every", [1, 2, 3, 7])  # 1: a run; 7: others' entries in between
def test_fetch_finds_every_entry_asked_for_in_the_order_asked(stream, every):
    ids = append(stream, 200)
    wanted = ids[5::every][:40]
    wanted = wanted[1:] + wanted[:1]  # not in stream order
    entries = stream.fetch(wanted)
    assert [e.entry_id for e in entries] == wanted
    assert [e.body for e in entries] == [b'{"n": %d}' % ids.index(i) for i in wanted]
    assert all(e.hint is None and e.received_ms == ids.index(e.entry_id) for e in entries)


def test_fetch_leaves_out_entries_already_acknowledged(stream):
    ids = append(stream, 30)
    stream.client.xdel(stream.key, *ids[10:20])
    assert [e.entry_id for e in stream.fetch(ids)] == ids[:10] + ids[20:]
    assert stream.fetch(ids[10:20]) == []
    assert stream.fetch([]) == []


def test_fetch_keeps_the_event_type_hint(stream):
    stream.append("ev-1", b"{}", "WEBHOOK.MARKED_OPPORTUNITY")
    entry_id = stream.client.xrange(stream.key)[0][0].decode()
    (entry,) = stream.fetch([entry_id])
    assert (entry.event_id, entry.hint, entry.body) == ("ev-1", "WEBHOOK.MARKED_OPPORTUNITY",
                                                        b"{}")
