"""What earlier automations did to page an offset API: here only, to prove in tests that it loses records."""

from __future__ import annotations

from shared.billing.pagination import Page, Paginator


class NaiveOffsetPaginator(Paginator):
    """`offset += len(page)`: a record that changes mid-listing moves to the end, and the one behind it is skipped."""

    def __init__(self, since: str) -> None:
        super().__init__()
        self.since = since
        self.offset = 0

    def first(self) -> dict[str, str]:
        return {"updated_since": self.since, "offset": "0"} if self.since else {"offset": "0"}

    def advance(self, page: Page) -> dict[str, str] | None:
        if not page.has_more:
            return None
        self.offset += len(page.records)
        return {**self.first(), "offset": str(self.offset)}
