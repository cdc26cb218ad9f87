"""Self-signed certificates for local TLS servers, made with the openssl command."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def self_signed_files(folder: Path, host: str = "127.0.0.1",
                      name: str = "server") -> tuple[Path, Path]:
    """(certificate, key) files of a fresh self-signed certificate for the IP `host`; raises
    FileNotFoundError when openssl is missing (`make setup` installs it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl")
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={host}",
         "-addext", f"subjectAltName=IP:{host}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30)
    return cert, key
