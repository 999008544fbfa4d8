"""Where telemetry goes: Application Insights when a connection string is set, nowhere otherwise.

The code emits through the OpenTelemetry API only (`shared.telemetry`); without a configured provider those calls
cost next to nothing. The OpenCensus SDK was retired on 2024-09-30; `azure-monitor-opentelemetry` replaces it.

What the worker sends, and why only that. The Functions host already sends requests, the worker's log records (it
forwards them) and exceptions to Application Insights, with its own Entra sign-in
(`APPLICATIONINSIGHTS_AUTHENTICATION_STRING`). The worker adds what only it knows: the sync's metrics. Its log and
trace exporters default to off (`OTEL_LOGS_EXPORTER=none`, `OTEL_TRACES_EXPORTER=none`) so nothing is sent twice;
set either to another value to turn it on. Application Insights has local authentication off, so the worker signs
in with the app's managed identity, the one the authentication string names.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from shared import logs
from shared.settings import Settings

log = logs.get_logger("shared.observability")
CONNECTION_SETTING = "APPLICATIONINSIGHTS_CONNECTION_STRING"
SERVICE_NAME = "billing-crm-sync"
# OpenTelemetry's own switches, read by the distro: defaults here, an app setting wins.
DEFAULT_ENVIRONMENT = {
    "OTEL_SERVICE_NAME": SERVICE_NAME,
    "OTEL_LOGS_EXPORTER": "none",
    "OTEL_TRACES_EXPORTER": "none",
}


def telemetry_credential(settings: Settings) -> Any:
    """The Entra credential that sends telemetry, or None when the authentication string is not set (local auth)."""
    if not settings.appinsights_auth:
        return None
    from azure.identity import ManagedIdentityCredential  # noqa: PLC0415 - Azure only

    client_id = settings.appinsights_client_id
    return ManagedIdentityCredential(client_id=client_id) if client_id else ManagedIdentityCredential()


def configure_telemetry(settings: Settings, **options: Any) -> bool:
    """Call `configure_azure_monitor()` when a connection string is set; True when it was.

    `options` go to `configure_azure_monitor` as they are (a test passes `disable_offline_storage=True`). The export
    interval is OpenTelemetry's `OTEL_METRIC_EXPORT_INTERVAL`, 60 s by default."""
    if not settings.appinsights_connection:
        return False
    try:
        distro = importlib.import_module("azure.monitor.opentelemetry")
    except ImportError:
        log.warning("%s is set but azure-monitor-opentelemetry is not installed: no telemetry is exported",
                    CONNECTION_SETTING)  # fmt: skip
        return False
    for name, value in DEFAULT_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    distro.configure_azure_monitor(
        connection_string=settings.appinsights_connection.get_secret_value(),
        credential=telemetry_credential(settings),
        enable_live_metrics=False,  # the host's live metrics already show invocations
        enable_performance_counters=False,  # the platform collects them
        **options,
    )
    log.info("telemetry: metrics go to Application Insights%s",
             " (Entra sign-in)" if settings.appinsights_auth else "")  # fmt: skip
    return True
