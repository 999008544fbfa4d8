"""The listing engine: every id changed in billing since a time, page by page, resumable from a checkpoint.

Fan-out drives it one page at a time and persists its `ListingPosition` between pages, so a crash or a spent time
budget resumes at the next request. What it guarantees (docs/sync.md, "Fan-out"):

- pages come from the configured paginator (`KeysetOverOffset` on an offset API loses no record however records
  change during the listing; see `shared.billing.pagination`);
- an empty page where records are due is silent throttling, raised by the client and retried there;
- the records at the boundary timestamp that the previous page already gave are not given again;
- a round that ends with fewer ids than the count said is silent throttling the page checks missed: the listing
  starts again (up to `max_rounds`); a listing still short after the last round ends `short`, and the caller keeps
  its watermark so the next run lists the same range again;
- a listing that runs far past what the count allows (a platform that never says "no more") is a contract error,
  not an endless loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shared import logs
from shared.billing.client import BillingClient
from shared.billing.models import Entity, Light
from shared.billing.pagination import Paginator
from shared.errors import ContractError

log = logs.get_logger("shared.billing")
MAX_ROUNDS = 3


@dataclass
class ListingPosition:
    """Where a listing stands: what a checkpoint keeps between pages."""

    since: str = ""
    expected: int = 0  # what the count endpoint said when the listing started
    round: int = 1
    pages: int = 0  # pages read in this round
    listed: int = 0  # ids given in this round
    params: dict[str, str] | None = None  # the next request's parameters; None before the first
    boundary: tuple[str, list[str]] = ("", [])  # (updated_at, ids at it) of the last page, for de-duplication


@dataclass(frozen=True)
class ListedPage:
    ids: list[str]  # the page's ids not given before at the boundary, in listing order
    restarted: bool = False  # the round came up short and the listing starts again


@dataclass
class ChangeListing:
    """Drive with `next_page()` until `finished`; then `short` says whether the count was reached."""

    client: BillingClient
    entity: Entity
    position: ListingPosition
    max_rounds: int = MAX_ROUNDS
    paginator_for: Callable[[str], Paginator] | None = None  # tests only: a strategy other than the client's
    _pager: Paginator = field(init=False)
    _next: dict[str, str] | None = field(init=False)

    def __post_init__(self) -> None:
        self._pager = self._paginator()
        params = self.position.params
        self._next = self._pager.resume(params) if params is not None else self._pager.start()
        self.position.params = self._next

    def _paginator(self) -> Paginator:
        make = self.paginator_for or self.client.paginator
        return make(self.position.since)

    @property
    def finished(self) -> bool:
        return self._next is None

    @property
    def short(self) -> bool:
        return self.position.listed < self.position.expected

    def _page_bound(self) -> int:
        """Pages one round may take: four times what the count needs, and ten more, before it is a loop."""
        return (self.position.expected // max(1, self.client.config.page_size) + 1) * 4 + 10

    async def next_page(self) -> ListedPage:
        if self._next is None:
            raise RuntimeError("the listing has finished")
        pos = self.position
        if pos.pages >= self._page_bound():
            raise ContractError(
                f"billing list {self.entity}: more than {self._page_bound()} pages for {pos.expected} records; "
                "the platform never ends the listing"
            )
        page = await self.client.list_page(self.entity, self._next, expect_records=pos.pages > 0 or pos.expected > 0)
        ids = new_ids(pos, page.records)
        pos.pages += 1
        pos.listed += len(ids)
        self._next = pos.params = self._pager.next_params(page)
        restarted = self._next is None and self.short and pos.round < self.max_rounds
        if restarted:
            self._restart()
        return ListedPage(ids, restarted)

    def _restart(self) -> None:
        pos = self.position
        log.warning(
            "billing list %s: listed %d ids but the count said %d; listing again (round %d, silent throttling)",
            self.entity, pos.listed, pos.expected, pos.round + 1,
        )  # fmt: skip
        pos.round += 1
        pos.pages, pos.listed, pos.boundary = 0, 0, ("", [])
        self._pager = self._paginator()
        self._next = pos.params = self._pager.start()


def new_ids(position: ListingPosition, records: tuple[Light, ...]) -> list[str]:
    """The page's ids less those the previous page gave at the same boundary timestamp; moves the boundary."""
    stamp, at_stamp = position.boundary
    seen = set(at_stamp)
    fresh = [r.id for r in records if not (r.updated_at == stamp and r.id in seen)]
    if records:
        last = records[-1].updated_at
        ids_at_last = [r.id for r in records if r.updated_at == last]
        position.boundary = (last, sorted(set(ids_at_last) | (seen if last == stamp else set())))
    return list(dict.fromkeys(fresh))
