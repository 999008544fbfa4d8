"""A local test CA (trustme) and a server certificate for 127.0.0.1 and localhost."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class LocalTls:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def make_tls(directory: Path) -> LocalTls:
    """Write ca.pem (trust this), server.pem and server.key into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="billing-crm-sync local test CA")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = LocalTls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(str(paths.ca_pem))
    cert.private_key_pem.write_to_path(str(paths.key_pem))
    with paths.cert_pem.open("wb") as fh:
        for blob in cert.cert_chain_pems:
            fh.write(blob.bytes())
    paths.key_pem.chmod(0o600)
    return paths
