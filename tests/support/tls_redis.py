"""A real redis-server that speaks only TLS, with a self-signed certificate."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from config.local import free_port, stop_group, wait_port
from tests.support.certs import self_signed_files


@contextmanager
def tls_redis(folder: Path) -> Iterator[tuple[int, Path]]:
    """(port, CA certificate) of a TLS-only Redis that does not ask clients for certificates."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = self_signed_files(folder, name="redis")
    port = free_port()
    log = folder / "redis.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", "0",
             "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
             "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--bind", "127.0.0.1",
             "--save", "", "--dir", str(folder)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port, proc, "redis-server (TLS)", log)
        yield port, cert
    finally:
        stop_group(proc)
