"""An open-loop load generator: POSTs bodies at a fixed rate and times each from its due moment.

    python -m bench.loadgen --url URL --rate 1500 --bodies FILE --out FILE [--connections 32]

Body i is due at start + i / rate, whether or not earlier requests have been answered; it waits
for a free keep-alive connection (of --connections) and its latency is counted from the due
moment, so a slow server cannot hide its queueing by slowing the generator down (the
"coordinated omission" of closed-loop tools). It runs in a process of its own so that the
benchmark's receivers (CRM, subscriber, SMTP) do not share its interpreter lock.

--bodies holds one JSON body per line; each line is sent once. --out gets one JSON array per
request: [index, due, sent, answered, status, event id or null], times as time.time().
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from urllib.parse import urlsplit

import orjson

FELL_BEHIND_SECONDS = 5.0  # requests due this long ago and not yet sent: the run is void


class Result:
    def __init__(self, total: int):
        self.rows: list[list] = [[]] * total
        self.late = 0.0  # the largest wait between a request's due moment and its send


async def _connection(host: str, port: int, head: bytes, bodies: list[bytes],
                      queue: asyncio.Queue, due0: float, rate: float, result: Result) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            index = await queue.get()
            if index is None:
                return
            body = bodies[index]
            sent = time.time()
            result.late = max(result.late, sent - (due0 + index / rate))
            for _attempt in range(2):  # a connection the server closed is reopened once
                try:
                    writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
                    status, answer = await _read_response(reader)
                    break
                except (ConnectionError, asyncio.IncompleteReadError):
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
            else:
                status, answer = 0, b""
            event_id = None
            if 200 <= status < 300 and answer.startswith(b'{"id"'):
                event_id = orjson.loads(answer)["id"]
            result.rows[index] = [index, due0 + index / rate, sent, time.time(), status,
                                  event_id]
    finally:
        writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length) if length else b""


async def run(url: str, rate: float, bodies: list[bytes], connections: int) -> Result:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: ").encode()
    result = Result(len(bodies))
    queue: asyncio.Queue = asyncio.Queue()
    due0 = time.time() + 0.2
    tasks = [asyncio.create_task(_connection(host, port, head, bodies, queue, due0, rate,
                                             result)) for _ in range(connections)]
    for index in range(len(bodies)):
        wait = due0 + index / rate - time.time()
        if wait > 0.001:
            await asyncio.sleep(wait)
        queue.put_nowait(index)
        if queue.qsize() > rate * FELL_BEHIND_SECONDS:
            break  # the server is not keeping up at all; what was sent is still reported
    for _ in tasks:
        queue.put_nowait(None)
    await asyncio.gather(*tasks)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--bodies", required=True, help="file with one JSON body per line")
    parser.add_argument("--out", required=True, help="where to write the per-request rows")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    with open(args.bodies, "rb") as handle:
        bodies = handle.read().splitlines()
    result = asyncio.run(run(args.url, args.rate, bodies, args.connections))
    rows = [row for row in result.rows if row]
    with open(args.out, "wb") as handle:
        handle.write(orjson.dumps(rows))
    print(f"loadgen: {len(rows)} of {len(bodies)} sent; largest wait from due to send "
          f"{1000 * result.late:.0f} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
