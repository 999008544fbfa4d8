"""Where telemetry goes: Application Insights when a connection string is set, nowhere otherwise.

The code emits through the OpenTelemetry API only (`shared.telemetry`); without a configured provider those calls
cost next to nothing. The OpenCensus SDK was retired on 2024-09-30; `azure-monitor-opentelemetry` replaces it.
"""

from __future__ import annotations

import importlib
import logging
import os

from shared.settings import Settings

log = logging.getLogger("shared.observability")
CONNECTION_SETTING = "APPLICATIONINSIGHTS_CONNECTION_STRING"


def configure_telemetry(settings: Settings) -> bool:
    """Call `configure_azure_monitor()` when a connection string is set; True when it was."""
    if not settings.appinsights_connection:
        return False
    try:
        distro = importlib.import_module("azure.monitor.opentelemetry")
    except ImportError:
        log.warning("%s is set but azure-monitor-opentelemetry is not installed: no telemetry is exported",
                    CONNECTION_SETTING)  # fmt: skip
        return False
    os.environ.setdefault("OTEL_SERVICE_NAME", "billing-crm-sync")
    distro.configure_azure_monitor(connection_string=settings.appinsights_connection.get_secret_value())
    return True
