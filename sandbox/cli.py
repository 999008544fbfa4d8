"""`python -m sandbox <command>`: the local platform's command line (dev only, never deployed)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

from sandbox.azurite import DEFAULT_PORTS, ROOT, Azurite, AzuriteError
from sandbox.billing_sim.run import billing_server
from sandbox.dataverse_sim.run import dataverse_server
from sandbox.faults import FaultProfile, FaultProfileError, load_profile
from sandbox.host.errors import HostStartupError
from sandbox.host.runtime import HostOptions, LocalHost, default_settings_file
from sandbox.platform import PlatformOptions, platform
from sandbox.platform_demo import run_platform_demo
from sandbox.sync_demo import flush_metrics, metric_reader, run_sync_demo
from sandbox.telemetry_doc import DOC as TELEMETRY_DOC
from sandbox.telemetry_doc import render as render_telemetry_doc
from shared.mapping import render_markdown
from shared.settings import SettingsError

cli = typer.Typer(
    help="The local platform of billing-crm-sync: Azurite, the simulators and a local Functions host.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MetricsFileOpt = Annotated[
    Path | None,
    typer.Option(help="Write the app's metrics here as Application Insights customMetrics rows (JSON lines)."),
]
FaultsOpt = Annotated[
    str | None, typer.Option("--faults", help="Fault profile: none, realistic, hostile, or a JSON file.")
]


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("azure", "uvicorn", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def _profile(faults: str | None) -> FaultProfile:
    try:
        return load_profile(faults)
    except FaultProfileError as exc:
        raise _fail(str(exc)) from None


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


@cli.command()
def azurite(
    location: Annotated[
        Path | None,
        typer.Option(help="Keep data in this folder (default: a temporary folder, removed on exit)."),
    ] = None,
    in_memory: Annotated[bool, typer.Option(help="--inMemoryPersistence (can stall; see docs).")] = False,
    default_ports: Annotated[
        bool, typer.Option(help="Use 10000-10002, so that `UseDevelopmentStorage=true` reaches it.")
    ] = False,
) -> None:
    """Azurite alone on free loopback ports; prints the connection string; Ctrl-C stops it."""
    ports = DEFAULT_PORTS if default_ports else (0, 0, 0)
    try:
        with Azurite(location=location, in_memory=in_memory, ports=ports) as emulator:
            ep = emulator.endpoints
            typer.echo(f"blob:  http://{ep.host}:{ep.blob_port}")
            typer.echo(f"queue: http://{ep.host}:{ep.queue_port}")
            typer.echo(f"table: http://{ep.host}:{ep.table_port}")
            typer.echo(f"AzureWebJobsStorage={emulator.connection_string}", err=False)
            sys.stdout.flush()
            _wait_for_signal()
    except AzuriteError as exc:
        raise _fail(str(exc)) from None


async def _run_host(options: HostOptions) -> None:
    loop = asyncio.get_running_loop()
    host = LocalHost(options)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, host.request_stop)
    async with host:
        print(f"Local host listening on {host.http_url}", flush=True)
        await host.wait_stopped()


def _host_options(
    app_dir: Path,
    settings: Path | None,
    port: int | None,
    faults: str | None,
    once: list[str] | None,
    lease_seconds: float,
    drain_seconds: float,
) -> HostOptions:
    profile = _profile(faults)
    return HostOptions(
        app_dir=app_dir,
        settings_file=settings if settings is not None else default_settings_file(app_dir),
        faults=profile,
        http_port=port,
        once=tuple(once or ()),
        lease=timedelta(seconds=lease_seconds),
        drain_timeout=timedelta(seconds=drain_seconds),
    )


AppDirOpt = Annotated[Path, typer.Option("--app-dir", help="The Functions app folder (holds host.json).")]
SettingsOpt = Annotated[
    Path | None,
    typer.Option("--settings", help="Settings file (default: local.settings.json, else local.settings.sample.json)."),
]
PortOpt = Annotated[
    int | None,
    typer.Option("--port", help="HTTP port (default: Host.LocalHttpPort, else 7071; 0 = any free port)."),
]
OnceOpt = Annotated[list[str] | None, typer.Option("--once", help="Fire this timer function once at start-up.")]
LeaseOpt = Annotated[
    float, typer.Option("--lease-seconds", help="How long a message stays invisible while its function runs.")
]
DrainOpt = Annotated[
    float,
    typer.Option("--drain-seconds", help="On SIGINT/SIGTERM, how long in-flight invocations may finish."),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


@cli.command()
def host(
    app_dir: AppDirOpt = ROOT,
    settings: SettingsOpt = None,
    port: PortOpt = None,
    faults: FaultsOpt = None,
    once: OnceOpt = None,
    lease_seconds: LeaseOpt = 600.0,
    drain_seconds: DrainOpt = 30.0,
    verbose: VerboseOpt = False,
) -> None:
    """The local Functions host: runs the app in APP_DIR against the storage its settings name."""
    _logging(verbose)
    options = _host_options(app_dir, settings, port, faults, once, lease_seconds, drain_seconds)
    try:
        asyncio.run(_run_host(options))
    except HostStartupError as exc:
        raise _fail(str(exc)) from None


@cli.command()
def up(
    records: Annotated[int, typer.Option(help="Invoices in the billing simulator.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the billing data.")] = 1,
    faults: FaultsOpt = None,
    port: Annotated[int, typer.Option("--port", help="The local host's HTTP port.")] = 7071,
    schedule: Annotated[str, typer.Option(help="SYNC_SCHEDULE (NCRONTAB, with seconds).")] = "0 */1 * * * *",
    billing_db: Annotated[Path | None, typer.Option(help="Keep the billing simulator's SQLite store here.")] = None,
    dataverse_db: Annotated[Path | None, typer.Option(help="Keep the Dataverse simulator's SQLite store here.")] = None,
    metrics_file: MetricsFileOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Like `func start` plus the emulators: Azurite, both simulators and the app, in the foreground until Ctrl-C."""
    _logging(verbose)
    if metrics_file is not None:
        metric_reader(metrics_file)  # before the app builds its instruments
    options = PlatformOptions(
        records=records,
        seed=seed,
        profile=_profile(faults),
        billing_db=billing_db,
        dataverse_db=dataverse_db,
        schedule=schedule,
        http_port=port,
        work_dir=ROOT / ".local" / "up",
    )
    options.work_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with platform(options) as p:
            key = p.settings["SANDBOX_HOST_FUNCTION_KEY"]
            print(f"Functions host:  {p.host.http_url}  (x-functions-key: {key})", flush=True)
            print(f"  curl -H 'x-functions-key: {key}' {p.host.http_url}/api/health")
            print(f"  curl -H 'x-functions-key: {key}' {p.host.http_url}/api/dlq")
            print(
                f"  curl -X POST -H 'x-functions-key: {key}' -d '{{\"all\": true}}' {p.host.http_url}/api/dlq/reprocess"
            )
            print(f"  curl -X POST -H 'x-functions-key: {p.settings['SANDBOX_HOST_MASTER_KEY']}' "
                  f"{p.host.http_url}/admin/functions/fan_out   # run the timer now")  # fmt: skip
            print(f"Billing API:     {p.billing.url}  (key: BILLING_API_KEY in {p.work_dir / 'local.settings.json'})")
            print(f"Dataverse API:   {p.dataverse.api}  (CA: {p.dataverse.tls.ca_pem})")
            print(f"AzureWebJobsStorage={p.conn}", flush=True)
            if metrics_file is not None:
                print(f"Metrics:         {metrics_file}  (customMetrics rows, every 5 s)", flush=True)
            await stop.wait()
        if metrics_file is not None:
            flush_metrics()

    try:
        asyncio.run(serve())
    except (AzuriteError, HostStartupError, SettingsError) as exc:
        raise _fail(str(exc)) from None


def _local_secret(name: str, env: str) -> str:
    """A secret for a local simulator: from the environment, else generated and kept in .local/ (mode 0600)."""
    value = os.environ.get(env)
    if value:
        return value
    path = ROOT / ".local" / "secrets" / name
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    value = secrets.token_urlsafe(24)
    path.write_text(value, encoding="utf-8")
    return value


@cli.command("billing-sim")
def billing_sim(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 = any free port).")] = 0,
    records: Annotated[int, typer.Option(help="Invoices to generate; customers are a quarter of that.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the generated data.")] = 1,
    faults: FaultsOpt = None,
    db: Annotated[Path | None, typer.Option(help="Keep the data in this SQLite file (reused if it has data).")] = None,
    webhook_url: Annotated[str | None, typer.Option(help="POST a signed event here on every change.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """The billing platform simulator alone. API key: $BILLING_API_KEY, else .local/secrets/billing-api-key."""
    _logging(verbose)
    profile = _profile(faults)
    api_key = _local_secret("billing-api-key", "BILLING_API_KEY")
    webhook_secret = _local_secret("billing-webhook-secret", "BILLING_WEBHOOK_SECRET")
    with billing_server(
        records=records,
        seed=seed,
        profile=profile,
        api_key=api_key,
        db=db,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        port=port,
    ) as running:
        print(f"Billing simulator listening on {running.url}", flush=True)
        print(f"  OpenAPI: {running.url}/openapi.json; API key and webhook secret in {ROOT / '.local' / 'secrets'}")
        print(f"  records: {running.store.table_counts()}", flush=True)
        _wait_for_signal()


@cli.command("dataverse-sim")
def dataverse_sim(
    port: Annotated[int, typer.Option(help="HTTPS port on 127.0.0.1 (0 = any free port).")] = 0,
    faults: FaultsOpt = None,
    db: Annotated[Path | None, typer.Option(help="Keep the data in this SQLite file.")] = None,
    ca_dir: Annotated[
        Path | None, typer.Option(help="Write the local test CA (ca.pem) and server certificate here.")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """The Dataverse Web API simulator alone, over HTTPS. Client secret: $DATAVERSE_CLIENT_SECRET, else generated."""
    _logging(verbose)
    profile = _profile(faults)
    secret = _local_secret("dataverse-client-secret", "DATAVERSE_CLIENT_SECRET")
    with dataverse_server(client_secret=secret, profile=profile, db=db, ca_dir=ca_dir, port=port) as running:
        print(f"Dataverse simulator listening on {running.url} (Web API: {running.api})", flush=True)
        print(f"  trust this CA: {running.tls.ca_pem}")
        print(f"  token endpoint: {running.url}/{running.tenant_id}/oauth2/v2.0/token (any client id)")
        print(f"  client secret in {ROOT / '.local' / 'secrets' / 'dataverse-client-secret'}", flush=True)
        _wait_for_signal()


@cli.command("telemetry-doc")
def telemetry_doc(
    write: Annotated[bool, typer.Option(help="Write docs/telemetry.md instead of printing it.")] = False,
) -> None:
    """docs/telemetry.md, generated from shared/telemetry.py and the alert and workbook queries in infra/."""
    _print_or_write(render_telemetry_doc(), TELEMETRY_DOC, write=write)


@cli.command("data-dictionary")
def data_dictionary(
    write: Annotated[bool, typer.Option(help="Write docs/data-dictionary.md instead of printing it.")] = False,
) -> None:
    """The data dictionary generated from shared/mapping.py."""
    _print_or_write(render_markdown(), ROOT / "docs" / "data-dictionary.md", write=write)


def _print_or_write(text: str, path: Path, *, write: bool) -> None:
    """A generated doc: printed, or written to its place in docs/."""
    if write:
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    else:
        print(text)


@cli.command()
def demo(
    records: Annotated[int, typer.Option(help="Invoices in billing (customers: a quarter of that).")] = 50_000,
    seed: Annotated[int, typer.Option(help="Seed of the billing data and the CRM's drift.")] = 1,
    faults: FaultsOpt = "realistic",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the summary to this JSON file.")] = None,
    keep: Annotated[bool, typer.Option(help="Leave everything running afterwards; print URLs and keys.")] = False,
    billing_db: Annotated[Path | None, typer.Option(help="Keep the billing simulator's SQLite store here.")] = None,
    dataverse_db: Annotated[Path | None, typer.Option(help="Keep the Dataverse simulator's SQLite store here.")] = None,
    identities: Annotated[int, typer.Option(help="Dataverse application users to spread the load over.")] = 1,
    metrics_file: MetricsFileOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """A full sync, then an incremental one, against Azurite and both simulators; exit 0 only if CRM = billing."""
    _quiet_logging(verbose)
    profile = _profile(faults)
    options = PlatformOptions(
        records=records,
        seed=seed,
        profile=profile,
        billing_db=billing_db,
        dataverse_db=dataverse_db,
        identities=identities,
    )
    try:
        ok, _ = asyncio.run(
            run_sync_demo(
                records=records,
                seed=seed,
                profile_name=faults or "none",
                options=options,
                json_out=json_out,
                keep=keep,
                metrics_file=metrics_file,
            )
        )
    except (AzuriteError, HostStartupError, SettingsError) as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(code=130) from None
    raise typer.Exit(code=0 if ok else 1)


@cli.command("platform-demo")
def platform_demo(
    messages: Annotated[int, typer.Option(help="How many queue messages the demonstration sends.")] = 200,
    faults: FaultsOpt = "realistic",
    verbose: VerboseOpt = False,
) -> None:
    """The local platform proving its own queue semantics (a toy app; no sync)."""
    _quiet_logging(verbose)
    try:
        profile = load_profile(faults)
        ok = asyncio.run(run_platform_demo(messages=messages, profile=profile))
    except (FaultProfileError, AzuriteError, HostStartupError) as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code=0 if ok else 1)


def _quiet_logging(verbose: bool) -> None:
    if verbose:
        _logging(verbose)
        return
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for name in ("sandbox.host", "shared"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # expected failures under faults; the summary tells


def main() -> None:
    cli(prog_name="python -m sandbox")
