"""Every setting the app reads, in one pydantic-settings model, validated once at start-up.

App settings arrive as environment variables (locally from `local.settings.json` `Values`). Nothing else in the
package reads `os.environ`. A missing or invalid setting raises `SettingsError`, whose message names each setting
that is wrong and never echoes a secret's value.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_QUEUE = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$")
_TABLE_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,20}$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class SettingsError(ValueError):
    """One line per setting that is missing or wrong."""


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=True, frozen=True, populate_by_name=False)

    # ---- storage (queues, state tables) ----
    storage_connection: Annotated[str | None, Field(validation_alias=_env("AzureWebJobsStorage"))] = None
    storage_account: Annotated[str | None, Field(validation_alias=_env("AzureWebJobsStorage__accountName"))] = None
    storage_client_id: Annotated[str | None, Field(validation_alias=_env("AzureWebJobsStorage__clientId"))] = None
    storage_queue_uri: Annotated[str | None, Field(validation_alias=_env("AzureWebJobsStorage__queueServiceUri"))] = (
        None
    )
    storage_table_uri: Annotated[str | None, Field(validation_alias=_env("AzureWebJobsStorage__tableServiceUri"))] = (
        None
    )
    storage_blob_uri: Annotated[str | None, Field(validation_alias=_env("AzureWebJobsStorage__blobServiceUri"))] = None
    queue_name: Annotated[str, Field(validation_alias=_env("SYNC_QUEUE"))] = "billing-sync"
    table_prefix: Annotated[str, Field(validation_alias=_env("SYNC_TABLE_PREFIX"))] = ""

    # ---- billing platform ----
    billing_url: Annotated[str, Field(validation_alias=_env("BILLING_BASE_URL"))]
    billing_api_key: Annotated[SecretStr, Field(validation_alias=_env("BILLING_API_KEY"))]
    billing_pagination: Annotated[Literal["cursor", "offset"], Field(validation_alias=_env("BILLING_PAGINATION"))] = (
        "cursor"
    )
    billing_rate_limit_rps: Annotated[float, Field(gt=0, le=1000, validation_alias=_env("BILLING_RATE_LIMIT_RPS"))] = (
        10.0
    )
    billing_page_size: Annotated[int, Field(ge=10, le=1000, validation_alias=_env("BILLING_PAGE_SIZE"))] = 1000
    billing_retry_attempts: Annotated[int, Field(ge=1, le=50, validation_alias=_env("BILLING_RETRY_ATTEMPTS"))] = 6
    billing_retry_s: Annotated[int, Field(ge=1, le=900, validation_alias=_env("BILLING_RETRY_SECONDS"))] = 60
    billing_backoff_max_s: Annotated[
        int, Field(ge=1, le=300, validation_alias=_env("BILLING_RETRY_BACKOFF_MAX_SECONDS"))
    ] = 20
    billing_ca_bundle: Annotated[str | None, Field(validation_alias=_env("BILLING_CA_BUNDLE"))] = None
    webhook_secret: Annotated[SecretStr | None, Field(validation_alias=_env("BILLING_WEBHOOK_SECRET"))] = None
    webhook_tolerance_s: Annotated[int, Field(ge=10, le=3600, validation_alias=_env("WEBHOOK_TOLERANCE_SECONDS"))] = 300
    webhook_coalesce_s: Annotated[float, Field(ge=0, le=60, validation_alias=_env("WEBHOOK_COALESCE_SECONDS"))] = 2.0

    # ---- Dataverse ----
    dataverse_url: Annotated[str, Field(validation_alias=_env("DATAVERSE_URL"))]
    dataverse_auth: Annotated[
        Literal["client_secret", "managed_identity"], Field(validation_alias=_env("DATAVERSE_AUTH"))
    ] = "client_secret"
    dataverse_tenant_id: Annotated[str | None, Field(validation_alias=_env("DATAVERSE_TENANT_ID"))] = None
    dataverse_client_ids: Annotated[str | None, Field(validation_alias=_env("DATAVERSE_CLIENT_ID"))] = None
    dataverse_client_secrets: Annotated[SecretStr | None, Field(validation_alias=_env("DATAVERSE_CLIENT_SECRET"))] = (
        None
    )
    dataverse_authority: Annotated[str | None, Field(validation_alias=_env("DATAVERSE_AUTHORITY"))] = None
    dataverse_ca_bundle: Annotated[str | None, Field(validation_alias=_env("DATAVERSE_CA_BUNDLE"))] = None
    dataverse_max_concurrency: Annotated[
        int, Field(ge=1, le=52, validation_alias=_env("DATAVERSE_MAX_CONCURRENCY"))
    ] = 16
    dataverse_chunk_size: Annotated[int, Field(ge=1, le=1000, validation_alias=_env("DATAVERSE_CHUNK_SIZE"))] = 100
    dataverse_limit_window_s: Annotated[
        int, Field(ge=1, le=3600, validation_alias=_env("DATAVERSE_LIMIT_WINDOW_SECONDS"))
    ] = 300
    dataverse_limit_requests: Annotated[
        int, Field(ge=10, le=1_000_000, validation_alias=_env("DATAVERSE_LIMIT_REQUESTS"))
    ] = 6000
    dataverse_limit_execution_s: Annotated[
        int, Field(ge=1, le=360_000, validation_alias=_env("DATAVERSE_LIMIT_EXECUTION_SECONDS"))
    ] = 1200
    dataverse_retry_attempts: Annotated[int, Field(ge=1, le=50, validation_alias=_env("DATAVERSE_RETRY_ATTEMPTS"))] = 6
    dataverse_retry_s: Annotated[int, Field(ge=1, le=900, validation_alias=_env("DATAVERSE_RETRY_SECONDS"))] = 120
    dataverse_backoff_max_s: Annotated[
        int, Field(ge=1, le=300, validation_alias=_env("DATAVERSE_RETRY_BACKOFF_MAX_SECONDS"))
    ] = 20
    dataverse_fleet_size: Annotated[int, Field(ge=1, le=1000, validation_alias=_env("DATAVERSE_FLEET_SIZE"))] = 40

    # ---- circuit breakers (one per outside system, shared by every instance) ----
    breaker_failure_threshold: Annotated[
        int, Field(ge=1, le=1000, validation_alias=_env("BREAKER_FAILURE_THRESHOLD"))
    ] = 5
    breaker_open_s: Annotated[int, Field(ge=1, le=3600, validation_alias=_env("BREAKER_OPEN_SECONDS"))] = 30

    # ---- the sync ----
    schedule: Annotated[str, Field(validation_alias=_env("SYNC_SCHEDULE"))] = "0 */5 * * * *"
    batch_size: Annotated[int, Field(ge=1, le=500, validation_alias=_env("SYNC_BATCH_SIZE"))] = 200
    overlap_s: Annotated[int, Field(ge=0, le=86_400, validation_alias=_env("SYNC_OVERLAP_SECONDS"))] = 120
    fanout_budget_s: Annotated[int, Field(ge=5, le=3600, validation_alias=_env("FANOUT_BUDGET_SECONDS"))] = 240
    max_deferrals: Annotated[int, Field(ge=1, le=10_000, validation_alias=_env("SYNC_MAX_DEFERRALS"))] = 288
    entities: Annotated[str, Field(validation_alias=_env("SYNC_ENTITIES"))] = "customers,invoices"

    # ---- reconcile ----
    reconcile_schedule: Annotated[str, Field(validation_alias=_env("RECONCILE_SCHEDULE"))] = "0 0 2 * * *"
    reconcile_max_repairs: Annotated[
        int, Field(ge=0, le=10_000_000, validation_alias=_env("RECONCILE_MAX_REPAIRS"))
    ] = 10_000
    reconcile_max_attempts: Annotated[int, Field(ge=1, le=100, validation_alias=_env("RECONCILE_MAX_ATTEMPTS"))] = 3

    # ---- telemetry ----
    appinsights_connection: Annotated[
        SecretStr | None, Field(validation_alias=_env("APPLICATIONINSIGHTS_CONNECTION_STRING"))
    ] = None
    appinsights_auth: Annotated[
        str | None, Field(validation_alias=_env("APPLICATIONINSIGHTS_AUTHENTICATION_STRING"))
    ] = None

    @field_validator(
        "billing_url",
        "dataverse_url",
        "dataverse_authority",
        "storage_queue_uri",
        "storage_table_uri",
        "storage_blob_uri",
    )
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("dataverse_url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError("must be an https:// URL (Dataverse serves HTTPS only)")
        return value

    @field_validator("appinsights_connection")
    @classmethod
    def _connection_string(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        parts = _pairs(value.get_secret_value())
        if parts is None or not (parts.get("instrumentationkey") or parts.get("ingestionendpoint")):
            raise ValueError("must be an Application Insights connection string (InstrumentationKey=...;...)")
        return value

    @field_validator("appinsights_auth")
    @classmethod
    def _auth_string(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = _pairs(value)
        if (
            parts is None
            or parts.get("authorization", "").upper() != "AAD"
            or set(parts) - {"authorization", "clientid"}
        ):
            raise ValueError("must be 'Authorization=AAD' or 'ClientId=<client id>;Authorization=AAD'")
        if "clientid" in parts and not _GUID.match(parts["clientid"]):
            raise ValueError("ClientId must be the managed identity's client id (a GUID)")
        return value

    @field_validator("queue_name")
    @classmethod
    def _queue(cls, value: str) -> str:
        if not _QUEUE.match(value) or len(value) > 46:
            raise ValueError("must be 3-46 lowercase letters, digits and single hyphens (room for '-reconcile-poison')")
        return value

    @field_validator("table_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value and not _TABLE_PREFIX.match(value):
            raise ValueError("must be letters and digits, starting with a letter, at most 21 characters")
        return value

    @field_validator("entities")
    @classmethod
    def _entities(cls, value: str) -> str:
        names = [v.strip() for v in value.split(",") if v.strip()]
        unknown = sorted(set(names) - {"customers", "invoices"})
        if not names or unknown:
            raise ValueError(f"must list customers and/or invoices (unknown: {', '.join(unknown) or 'none given'})")
        return ",".join(n for n in ("customers", "invoices") if n in names)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        identity_uris = self.storage_queue_uri and self.storage_table_uri and self.storage_blob_uri
        if not (self.storage_connection or self.storage_account or identity_uris):
            raise ValueError(
                "AzureWebJobsStorage: set a connection string, AzureWebJobsStorage__accountName, or "
                "AzureWebJobsStorage__queueServiceUri, __tableServiceUri and __blobServiceUri"
            )
        if self.dataverse_auth == "client_secret":
            if not self.dataverse_tenant_id:
                raise ValueError("DATAVERSE_TENANT_ID: required when DATAVERSE_AUTH is client_secret")
            if not self.dataverse_client_ids or self.dataverse_client_secrets is None:
                raise ValueError(
                    "DATAVERSE_CLIENT_ID and DATAVERSE_CLIENT_SECRET: required when DATAVERSE_AUTH is client_secret"
                )
            ids = self.client_ids
            secrets = self.dataverse_client_secrets.get_secret_value().split(",")
            if len(secrets) not in (1, len(ids)):
                raise ValueError(
                    f"DATAVERSE_CLIENT_SECRET: {len(secrets)} secrets for {len(ids)} client ids in DATAVERSE_CLIENT_ID"
                )
        return self

    @cached_property
    def client_ids(self) -> list[str]:
        return [c.strip() for c in (self.dataverse_client_ids or "").split(",") if c.strip()]

    def client_secret_for(self, index: int) -> str:
        assert self.dataverse_client_secrets is not None  # noqa: S101 - checked by _consistent
        secrets = self.dataverse_client_secrets.get_secret_value().split(",")
        return secrets[index if len(secrets) > 1 else 0].strip()

    @property
    def entity_list(self) -> tuple[Literal["customers", "invoices"], ...]:
        return tuple(n for n in ("customers", "invoices") if n in self.entities.split(","))

    @property
    def appinsights_client_id(self) -> str | None:
        """The user-assigned identity that sends telemetry (`ClientId=` of the authentication string), if any."""
        parts = _pairs(self.appinsights_auth or "") or {}
        return parts.get("clientid") or None

    @property
    def queue_service_url(self) -> str:
        return self.storage_queue_uri or f"https://{self.storage_account}.queue.core.windows.net"

    @property
    def table_service_url(self) -> str:
        return self.storage_table_uri or f"https://{self.storage_account}.table.core.windows.net"

    @property
    def blob_service_url(self) -> str:
        return self.storage_blob_uri or f"https://{self.storage_account}.blob.core.windows.net"

    @property
    def poison_queue(self) -> str:
        return f"{self.queue_name}-poison"

    @property
    def reconcile_queue(self) -> str:
        """Reconcile's own queue, so that its batches can yield to the sync's backlog (`shared.worker`)."""
        return f"{self.queue_name}-reconcile"


def _pairs(text: str) -> dict[str, str] | None:
    """`Key=value;Key=value` (connection-string style) with lower-cased keys; None when it is not that shape."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            return None
        out[key.strip().lower()] = value.strip()
    return out or None


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Validate the settings (from `environ`, else the process environment). Raises SettingsError naming each one."""
    try:
        if environ is None:
            return Settings()  # type: ignore[call-arg]
        return Settings.model_validate(environ)
    except ValidationError as exc:
        raise SettingsError(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    aliases = {name: _alias(name) for name in Settings.model_fields}
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = [str(p) for p in err["loc"]]
        name = aliases.get(loc[0], loc[0]) if loc else ""
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = "required setting is missing"
        problems.append(f"{name}: {message}" if name else message)
    return "invalid settings: " + "; ".join(problems)


def _alias(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        return first if isinstance(first, str) else field
    return field
