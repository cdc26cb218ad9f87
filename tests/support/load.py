"""A steady client posting distinct fixture bodies to a live API, keeping every answer."""

from __future__ import annotations

import threading
import time

import orjson
import requests

from bench.drain import unique_body
from tests.conftest import FIXTURES, TOKEN

NAMES = ("mkt-v2-converted.json", "crm-deal-created.json", "legacy-leads-full.json")


class SteadyLoad:
    """Posts one body every `pause` seconds from a thread until stopped.

    `answers` holds each status code (0 when no answer came); `accepted` the event ids of
    the 202s."""

    def __init__(self, api_url: str, pause: float = 0.02):
        self.url = f"{api_url}/webhooks/rdstation?token={TOKEN}"
        self.pause = pause
        self.answers: list[int] = []
        self.accepted: list[str] = []
        self._templates = {name: orjson.loads((FIXTURES / name).read_bytes()) for name in NAMES}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        session = requests.Session()
        n = 0
        while not self._stop.is_set():
            name = NAMES[n % len(NAMES)]
            body = orjson.dumps(unique_body(self._templates[name], name, n))
            try:
                answer = session.post(self.url, data=body, timeout=10,
                                      headers={"Content-Type": "application/json"})
                self.answers.append(answer.status_code)
                if answer.status_code == 202:
                    self.accepted.append(answer.json()["id"])
            except requests.RequestException:
                self.answers.append(0)
            n += 1
            time.sleep(self.pause)
