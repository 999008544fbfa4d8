"""Start the Dataverse simulator over HTTPS with a local test CA: in a thread (tests, demo) or the foreground."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sandbox.dataverse_sim.app import DataverseSimulator
from sandbox.dataverse_sim.schema import TABLES, Table
from sandbox.dataverse_sim.store import DataverseStore
from sandbox.dataverse_sim.tls import LocalTls, make_tls
from sandbox.faults import FaultProfile
from sandbox.servers import ThreadedServer

TENANT = "00000000-0000-0000-0000-00000000b111"


@dataclass
class RunningDataverse:
    url: str  # the organization URL, as https://ORG.crm.dynamics.com
    simulator: DataverseSimulator
    store: DataverseStore
    tls: LocalTls
    server: ThreadedServer

    @property
    def api(self) -> str:
        return f"{self.url}/api/data/v9.2"

    @property
    def authority(self) -> str:
        return self.url

    @property
    def tenant_id(self) -> str:
        return TENANT

    @staticmethod
    def store_table(name: str) -> Table:
        return TABLES[name]


@contextmanager
def dataverse_server(
    *,
    client_secret: str,
    profile: FaultProfile | None = None,
    db: Path | None = None,
    ca_dir: Path | None = None,
    port: int = 0,
    dop_hint: int = 4,
) -> Iterator[RunningDataverse]:
    profile = profile or FaultProfile()
    with tempfile.TemporaryDirectory(prefix="dataverse-tls-") as tmp:
        tls = make_tls(ca_dir or Path(tmp))
        store = DataverseStore(db)
        simulator = DataverseSimulator(
            store, client_secret=client_secret, faults=profile.dataverse, seed=profile.seed, dop_hint=dop_hint
        )
        server = ThreadedServer(simulator, port=port, certfile=tls.cert_pem, keyfile=tls.key_pem).start()
        try:
            yield RunningDataverse(server.url, simulator, store, tls, server)
        finally:
            server.stop()
            store.close()
