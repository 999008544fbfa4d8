"""Azurite, the Azure Storage emulator, started by the project on free loopback ports in disk mode.

Facts this module relies on (docs/local-platform.md): Azurite binds port 0 and prints the port it got;
`--inMemoryPersistence` stalls single requests for tens of seconds, so a temporary `--location` is the default;
`--disableTelemetry` and `--skipApiVersionCheck` are required here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from sandbox.procutil import spawn, stop

ACCOUNT = "devstoreaccount1"
# The well-known development storage key, published in Microsoft's Azurite documentation. Not a secret.
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
DEFAULT_PORTS = (10000, 10001, 10002)  # what `UseDevelopmentStorage=true` points at
_LISTENING = re.compile(r"Azurite (Blob|Queue|Table) service is successfully listening at http://[^:]+:(\d+)")
ROOT = Path(__file__).resolve().parent.parent


class AzuriteError(RuntimeError):
    """Azurite could not be found or started."""


def azurite_binary(root: Path = ROOT) -> Path:
    binary = root / "node_modules" / ".bin" / "azurite"
    if not binary.exists():
        raise AzuriteError(f"Azurite is not installed at {binary}: run `npm ci` (make does it for you)")
    return binary


@dataclass(frozen=True)
class Endpoints:
    host: str
    blob_port: int
    queue_port: int
    table_port: int

    @property
    def connection_string(self) -> str:
        base = f"http://{self.host}"
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={base}:{self.blob_port}/{ACCOUNT};"
            f"QueueEndpoint={base}:{self.queue_port}/{ACCOUNT};"
            f"TableEndpoint={base}:{self.table_port}/{ACCOUNT};"
        )


@dataclass
class Azurite:
    """A running Azurite. Use as a context manager; `stop()` is idempotent and removes the temporary folder."""

    host: str = "127.0.0.1"
    location: Path | None = None
    in_memory: bool = False
    ports: tuple[int, int, int] = (0, 0, 0)  # blob, queue, table; 0 = any free port
    start_timeout_s: float = 60.0
    _proc: subprocess.Popen[str] | None = field(default=None, init=False, repr=False)
    _tmpdir: Path | None = field(default=None, init=False, repr=False)
    _endpoints: Endpoints | None = field(default=None, init=False, repr=False)
    _output: list[str] = field(default_factory=list, init=False, repr=False)

    @property
    def endpoints(self) -> Endpoints:
        if self._endpoints is None:
            raise AzuriteError("Azurite is not running")
        return self._endpoints

    @property
    def connection_string(self) -> str:
        return self.endpoints.connection_string

    def start(self) -> Endpoints:
        binary = azurite_binary()
        argv = [str(binary)]
        for svc, port in zip(("blob", "queue", "table"), self.ports, strict=True):
            argv += [f"--{svc}Host", self.host, f"--{svc}Port", str(port)]
        argv += ["--disableTelemetry", "--skipApiVersionCheck", "--silent"]
        if self.in_memory:
            argv.append("--inMemoryPersistence")
        else:
            if self.location is None:
                self._tmpdir = Path(tempfile.mkdtemp(prefix="azurite-"))
            location = self.location or self._tmpdir
            argv += ["--location", str(location)]
        self._proc = spawn(argv)
        try:
            self._endpoints = self._wait_ready(self._proc)
        except BaseException:
            self.stop()
            raise
        return self._endpoints

    def _wait_ready(self, proc: subprocess.Popen[str]) -> Endpoints:
        ports: dict[str, int] = {}
        done = threading.Event()
        stdout = proc.stdout
        assert stdout is not None  # noqa: S101 - spawn() always pipes stdout

        def reader() -> None:
            for line in stdout:
                self._output.append(line.rstrip())
                del self._output[:-50]
                match = _LISTENING.search(line)
                if match:
                    ports[match.group(1).lower()] = int(match.group(2))
                    if len(ports) == 3:
                        done.set()
            done.set()

        threading.Thread(target=reader, name="azurite-output", daemon=True).start()
        deadline = time.monotonic() + self.start_timeout_s
        while not done.wait(timeout=0.1):
            if time.monotonic() > deadline:
                raise AzuriteError(f"Azurite did not start within {self.start_timeout_s:.0f} s")
        if len(ports) != 3:
            tail = "\n".join(self._output[-10:])
            raise AzuriteError(f"Azurite exited before it was ready (exit code {proc.poll()}):\n{tail}")
        return Endpoints(self.host, ports["blob"], ports["queue"], ports["table"])

    def stop(self) -> None:
        if self._proc is not None:
            stop(self._proc)
            self._proc = None
        self._endpoints = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Azurite:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
