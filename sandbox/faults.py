"""Fault profiles: JSON validated by pydantic; unknown keys are errors naming the key.

Each section is described where its simulator is: docs/local-platform.md (host), docs/billing-api.md, docs/dataverse.md.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

BUILTIN = ("none", "realistic", "hostile")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Rate = Field(default=0.0, ge=0.0, le=1.0)


class RateLimit(_Strict):
    requests_per_second: float = Field(gt=0)
    burst: int = Field(default=1, ge=1)
    mode: Literal["silent", "429"] = "silent"


class LatencyMs(_Strict):
    min: float = Field(default=0.0, ge=0)
    max: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> LatencyMs:
        if self.max < self.min:
            raise ValueError("max must be at least min")
        return self


class Outage(_Strict):
    start_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)


class BillingFaults(_Strict):
    rate_limit: RateLimit | None = None
    error_rate: float = Rate
    timeout_rate: float = Rate
    latency_ms: LatencyMs | None = None
    outages: tuple[Outage, ...] = ()
    pagination: Literal["cursor", "offset"] = "cursor"
    mutations_per_second: float = Field(default=0.0, ge=0)
    drop_ids_rate: float = Rate
    invalid_record_rate: float = Rate


class ServiceProtection(_Strict):
    window_s: float = Field(default=300, gt=0)
    requests: int = Field(default=6000, ge=1)
    execution_ms: float = Field(default=1_200_000, gt=0)
    concurrent: int = Field(default=52, ge=1)


class RevertingPlugin(_Strict):
    """A synchronous plugin on update of `table` that puts `column` back to what it was before the write, as a
    misbehaving customisation in a real CRM would: what the sync writes there never stays."""

    table: str
    column: str

    @model_validator(mode="after")
    def _exists(self) -> RevertingPlugin:
        from sandbox.dataverse_sim.schema import TABLES  # noqa: PLC0415 - only a profile with a plugin needs it

        table = TABLES.get(self.table)
        if table is None or self.column not in table.by_name or self.column == table.primary_id:
            raise ValueError(f"{self.table}.{self.column} is not a column the plugin can put back")
        return self


class DataverseFaults(_Strict):
    service_protection: ServiceProtection | None = None
    reverting_plugin: RevertingPlugin | None = None
    ms_per_record: float = Field(default=0.0, ge=0)
    error_rate: float = Rate
    latency_ms: LatencyMs | None = None
    outages: tuple[Outage, ...] = ()
    reject_rate: float = Rate
    token_ttl_s: float = Field(default=3600, gt=0)


class HostFaults(_Strict):
    duplicate_delivery_rate: float = Rate
    crash_after_success_rate: float = Rate


class FaultProfile(_Strict):
    seed: int = 0
    billing: BillingFaults = BillingFaults()
    dataverse: DataverseFaults = DataverseFaults()
    host: HostFaults = HostFaults()

    def rng(self, stream: str) -> random.Random:
        """An independent, repeatable random stream per component, drawn from the profile's seed."""
        return random.Random(f"{self.seed}:{stream}")


class FaultProfileError(ValueError):
    """A profile that cannot be used; the message names the file and the key."""


def _describe(exc: ValidationError, source: str) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{where}: {what}")
    return f"fault profile {source}: " + "; ".join(problems)


def parse_profile(text: str, *, source: str) -> FaultProfile:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FaultProfileError(f"fault profile {source}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    try:
        return FaultProfile.model_validate(data)
    except ValidationError as exc:
        raise FaultProfileError(_describe(exc, source)) from None


def load_profile(name_or_path: str | None) -> FaultProfile:
    """A built-in profile by name (`none`, `realistic`, `hostile`) or a JSON file by path."""
    if name_or_path is None or name_or_path == "none":
        return FaultProfile()
    if name_or_path in BUILTIN:
        text = resources.files("sandbox.profiles").joinpath(f"{name_or_path}.json").read_text(encoding="utf-8")
        return parse_profile(text, source=name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise FaultProfileError(
            f"fault profile {name_or_path!r}: neither a built-in profile ({', '.join(BUILTIN)}) nor a file"
        )
    return parse_profile(path.read_text(encoding="utf-8"), source=str(path))
