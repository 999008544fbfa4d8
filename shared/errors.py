"""Every failure, grouped by what should happen next (the pattern of singer_sdk.exceptions).

- TransientError: retry in process with back-off (bounded); then fail the invocation so the host redelivers.
- FatalError: retrying cannot help (bad settings, rejected credentials, a broken contract); stop and alert.
- CircuitOpenError: the outside system is down; defer the work without burning the dequeue budget.
- InvalidRecord (a result, not an exception): one record is bad; dead-letter it and go on with the rest.

Messages name the system, the operation and the HTTP status; never a header value, a key or a record's content.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class SyncError(Exception):
    """Base of the errors this package raises."""

    def __init__(
        self,
        message: str,
        *,
        system: str = "",
        status_code: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.system = system
        self.status_code = status_code
        self.code = code
        self.retry_after = retry_after
        self.request_id = request_id

    @property
    def is_transient(self) -> bool:
        return isinstance(self, TransientError)

    def to_dict(self) -> dict[str, Any]:
        """What a dead-letter row or a log line may hold."""
        return {
            "type": type(self).__name__,
            "message": str(self),
            "system": self.system,
            "status_code": self.status_code,
            "code": self.code,
            "retry_after": self.retry_after,
            "request_id": self.request_id,
            "transient": self.is_transient,
        }


class TransientError(SyncError):
    """Timeouts, connection failures, 5xx: worth retrying."""


class ThrottledError(TransientError):
    """429, or throttling the platform did not admit to."""


class SilentThrottleError(ThrottledError):
    """A 200 answer that cannot be right: an empty page after `has_more`, a short bulk fetch, a short listing."""


class FatalError(SyncError):
    """Retrying cannot help."""


class AuthError(FatalError):
    """Credentials were rejected (401/403)."""


class ContractError(FatalError):
    """The outside system answered something our contract with it does not allow (malformed page, loop)."""


class NotFoundError(SyncError):
    """The system says the record does not exist (404 on a single fetch)."""


class CircuitOpenError(SyncError):
    """The breaker of this outside system is open."""


class SyncBusy(CircuitOpenError):
    """Reconcile yields to the sync: a fan-out listing is under way, so its messages go first. Deferred like an
    outage (a visibility delay, no dequeue budget spent)."""


@dataclass(frozen=True)
class InvalidRecord:
    """A record that breaks the contract; `reason` names the field."""

    entity: str
    record_id: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
