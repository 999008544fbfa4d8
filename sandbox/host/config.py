"""host.json and local.settings.json, read the way the Functions host reads them.

Only what the local host honours is modelled; docs/local-platform.md lists each key and the test proving it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sandbox.host.errors import HostStartupError

_TIMESPAN = re.compile(r"^(?:(?P<days>\d+)\.)?(?P<h>\d{1,2}):(?P<m>\d{1,2}):(?P<s>\d{1,2})(?:\.(?P<frac>\d{1,7}))?$")
_SETTING_REF = re.compile(r"%([^%]+)%")


def parse_timespan(value: object, *, where: str) -> timedelta:
    """Parse a .NET TimeSpan string `[d.]hh:mm:ss[.fffffff]`. Numbers are refused: .NET reads "2000" as days."""
    if not isinstance(value, str):
        raise HostStartupError(f'{where}: expected a TimeSpan string like "00:00:30", got {value!r}')
    match = _TIMESPAN.match(value.strip())
    if not match:
        raise HostStartupError(f'{where}: {value!r} is not a TimeSpan ("hh:mm:ss" or "d.hh:mm:ss")')
    h, m, s = int(match["h"]), int(match["m"]), int(match["s"])
    if h > 23 or m > 59 or s > 59:
        raise HostStartupError(f"{where}: {value!r} has an hour, minute or second out of range")
    frac = match["frac"] or "0"
    return timedelta(
        days=int(match["days"] or 0),
        hours=h,
        minutes=m,
        seconds=s,
        microseconds=int(frac.ljust(7, "0")) // 10,
    )


@dataclass(frozen=True)
class QueueOptions:
    """`extensions.queues` of host.json, with the Storage Queues extension 5.x defaults."""

    batch_size: int = 16
    new_batch_threshold: int = field(default_factory=lambda: (os.cpu_count() or 1) * 16 // 2)
    max_dequeue_count: int = 5
    visibility_timeout: timedelta = timedelta(0)
    max_polling_interval: timedelta = timedelta(minutes=1)
    message_encoding: str = "base64"

    @property
    def max_concurrency(self) -> int:
        return self.batch_size + self.new_batch_threshold


@dataclass(frozen=True)
class HostConfig:
    path: Path
    queues: QueueOptions
    route_prefix: str = "api"
    function_timeout: timedelta | None = timedelta(minutes=30)
    unknown_keys: tuple[str, ...] = ()


def _lower_keys(section: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in section.items()}


def _int_in(value: object, lo: int, hi: int, *, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise HostStartupError(f"{where}: expected a whole number from {lo} to {hi}, got {value!r}")
    return value


def load_host_json(app_dir: Path) -> HostConfig:
    path = app_dir / "host.json"
    if not path.is_file():
        raise HostStartupError(f"{path}: not found (every Functions app has a host.json at its root)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HostStartupError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise HostStartupError(f"{path}: the top level must be a JSON object")
    top = _lower_keys(raw)
    if top.get("version") != "2.0":
        raise HostStartupError(f'{path}: "version" must be "2.0", got {top.get("version")!r}')
    extensions = _lower_keys(top.get("extensions") or {})
    unknown: list[str] = []

    q_raw = _lower_keys(extensions.get("queues") or {})
    known_q = {
        "batchsize", "newbatchthreshold", "maxdequeuecount", "visibilitytimeout", "maxpollinginterval",
        "messageencoding",
    }  # fmt: skip
    unknown += [f"extensions.queues.{k}" for k in q_raw if k not in known_q]
    where = f"{path}: extensions.queues"
    defaults = QueueOptions()
    batch_size = _int_in(q_raw.get("batchsize", defaults.batch_size), 1, 32, where=f"{where}.batchSize")
    threshold_default = (os.cpu_count() or 1) * batch_size // 2
    threshold = _int_in(
        q_raw.get("newbatchthreshold", threshold_default), 0, 10_000, where=f"{where}.newBatchThreshold"
    )
    max_dequeue = _int_in(q_raw.get("maxdequeuecount", 5), 1, 10_000, where=f"{where}.maxDequeueCount")
    visibility = (
        parse_timespan(q_raw["visibilitytimeout"], where=f"{where}.visibilityTimeout")
        if "visibilitytimeout" in q_raw
        else defaults.visibility_timeout
    )
    if visibility > timedelta(days=7):
        raise HostStartupError(f"{where}.visibilityTimeout: at most 7 days (the queue service's limit)")
    polling = (
        parse_timespan(q_raw["maxpollinginterval"], where=f"{where}.maxPollingInterval")
        if "maxpollinginterval" in q_raw
        else defaults.max_polling_interval
    )
    if polling < timedelta(milliseconds=100):
        raise HostStartupError(f"{where}.maxPollingInterval: at least 00:00:00.100")
    encoding = str(q_raw.get("messageencoding", "base64")).lower()
    if encoding not in ("base64", "none"):
        raise HostStartupError(f'{where}.messageEncoding: "base64" or "none", got {encoding!r}')
    queues = QueueOptions(batch_size, threshold, max_dequeue, visibility, polling, encoding)

    http_raw = _lower_keys(extensions.get("http") or {})
    prefix = http_raw.get("routeprefix", "api")
    if not isinstance(prefix, str):
        raise HostStartupError(f"{path}: extensions.http.routePrefix must be a string")

    timeout: timedelta | None = timedelta(minutes=30)
    if "functiontimeout" in top:
        value = top["functiontimeout"]
        timeout = None if value in (None, "-1") else parse_timespan(value, where=f"{path}: functionTimeout")
    return HostConfig(path, queues, prefix.strip("/"), timeout, tuple(unknown))


@dataclass(frozen=True)
class LocalSettings:
    path: Path | None
    values: dict[str, str]
    http_port: int | None = None


def load_local_settings(path: Path | None) -> LocalSettings:
    """Read local.settings.json. A missing file is allowed only when no path was asked for explicitly."""
    if path is None:
        return LocalSettings(None, {})
    if not path.is_file():
        raise HostStartupError(f"{path}: settings file not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HostStartupError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise HostStartupError(f"{path}: the top level must be a JSON object")
    if raw.get("IsEncrypted"):
        raise HostStartupError(f"{path}: IsEncrypted is true; the local host reads only unencrypted settings")
    values = raw.get("Values") or {}
    if not isinstance(values, dict):
        raise HostStartupError(f'{path}: "Values" must be an object of strings')
    out: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            out[key] = str(value)
        else:
            raise HostStartupError(f'{path}: Values["{key}"] must be a string, number or boolean')
    host = raw.get("Host") or {}
    port = host.get("LocalHttpPort") if isinstance(host, dict) else None
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
        raise HostStartupError(f"{path}: Host.LocalHttpPort must be a port number")
    return LocalSettings(path, out, port)


class Settings:
    """App settings as the app sees them: the process environment first, then local.settings.json Values."""

    def __init__(self, values: Mapping[str, str], source: Path | None) -> None:
        self._values = dict(values)
        self.source = source

    def get(self, name: str) -> str | None:
        env = os.environ.get(name)
        if env is not None:
            return env
        return self._values.get(name)

    def require(self, name: str, *, needed_by: str) -> str:
        value = self.get(name)
        if value is None or value == "":
            where = f" (not in the environment nor in {self.source})" if self.source else " (not in the environment)"
            raise HostStartupError(f"setting {name!r} needed by {needed_by} is not defined{where}")
        return value

    def resolve(self, text: str, *, needed_by: str) -> str:
        """Replace every `%NAME%` with the setting NAME, as the host does for binding expressions."""
        return _SETTING_REF.sub(lambda m: self.require(m.group(1), needed_by=needed_by), text)

    def environ(self) -> dict[str, str]:
        """The Values that the environment does not already define, to export to the app's process."""
        return {k: v for k, v in self._values.items() if k not in os.environ}
