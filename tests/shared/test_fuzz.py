"""The fuzz suite: arbitrary input at every boundary, against Azurite and the billing simulator.

- the queue contract: arbitrary bytes, JSON of any shape and depth, and valid messages with one field replaced by
  anything, delivered to the worker as the queue holds them; a delivery that raises goes on to the poison handler,
  as the host would send it there after its last try;
- every HTTP endpoint: arbitrary bodies and query strings to the DLQ list and reprocess, arbitrary events (signed
  and unsigned) to the webhook, and health between them.

Invariants: nothing escapes the poison handler (the host stays up), every delivery ends in the DLQ or processed
(a malformed one adds one DLQ occurrence), every HTTP answer is 2xx or 4xx with a JSON reason, and nothing written
to a DLQ row or a log line carries a raw control character.
"""

from __future__ import annotations

import base64
import json
import logging
import string
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import azure.functions as func
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox.billing_sim.run import RunningBilling, billing_server
from shared import coalesce, dlq, dlq_api, health, poison, webhook, worker
from shared.runtime import Runtime
from tests.shared.runtimes import runtime_for

pytestmark = pytest.mark.anyio
KEY = "test-billing-key"
SECRET = "whsec-fuzz"
FUZZ = settings(
    max_examples=70,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run: a failure is reproducible from the log
)
UNPRINTABLE = {chr(c) for c in (*range(32), *range(127, 160), 0x2028, 0x2029)}


@pytest.fixture(scope="module")
def billing() -> Iterator[RunningBilling]:
    with billing_server(records=20, seed=3, api_key=KEY) as running:
        yield running


@pytest.fixture
async def runtime(conn: str, billing: RunningBilling) -> AsyncIterator[Runtime]:
    async with runtime_for(
        conn, BILLING_BASE_URL=billing.url, BILLING_API_KEY=KEY, BILLING_RATE_LIMIT_RPS="1000",
        BILLING_RETRY_ATTEMPTS="1", BILLING_WEBHOOK_SECRET=SECRET,
    ) as built:  # fmt: skip
        yield built


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=30,
)
deep = st.integers(1, 20_000).map(lambda n: "[" * n + "]" * n)
ids = st.text(alphabet=string.ascii_letters + string.digits + "_-/#?%'\" \n\x00é", min_size=0, max_size=30)
printable_ids = st.text(alphabet=string.ascii_letters + string.digits + "_-/#?%'\" é", min_size=1, max_size=30)


@st.composite
def near_valid(draw: st.DrawFn) -> str:
    """A valid message with one field replaced by anything (or an id list of anything)."""
    some_ids = draw(st.lists(printable_ids | printable_ids | ids, min_size=1, max_size=5))
    base: dict[str, Any] = {"v": 1, "run_id": "run-fuzz", "batch_id": "b-fuzz", "entity": "invoices", "ids": some_ids}
    field = draw(st.sampled_from([*base, "source", "deferrals", "force", "dlq_token", "extra"]))
    if draw(st.integers(0, 2)) == 0:  # two in three stay valid, so the worker's whole path is fuzzed too
        base[field] = draw(json_values)
    return json.dumps(base)


bodies = st.one_of(
    st.binary(max_size=300).map(lambda b: (b, False)),  # as the queue holds them: mostly not base64
    json_values.map(lambda v: (json.dumps(v).encode(), True)),
    deep.map(lambda text: (text.encode(), True)),
    near_valid().map(lambda text: (text.encode(), True)),
    near_valid().map(lambda text: (text.encode(), True)),
    near_valid().map(lambda text: (text.encode(), True)),
)


async def _occurrences(runtime: Runtime) -> int:
    rows = await dlq.rows(runtime.tables, dlq.Selection(all=True, statuses=()), limit=100_000)
    return sum(int(r.get("occurrences") or 0) for r in rows)


def _clean(values: list[str]) -> list[str]:
    return [v for v in values if UNPRINTABLE & set(v)]


async def _dlq_texts(runtime: Runtime) -> list[str]:
    rows = await dlq.rows(runtime.tables, dlq.Selection(all=True, statuses=()), limit=100_000)
    return [str(v) for row in rows for k, v in row.items() if k != "Timestamp"]


def _log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("shared")]
    caplog.clear()
    return lines


@FUZZ
@given(body=bodies)
async def test_every_message_ends_processed_or_in_the_dlq_and_nothing_escapes_the_poison_handler(
    runtime: Runtime, caplog: pytest.LogCaptureFixture, body: tuple[bytes, bool]
) -> None:
    raw, encode = body
    content = base64.b64encode(raw) if encode else raw
    before = await _occurrences(runtime)
    caplog.set_level(logging.INFO, logger="shared")
    try:
        result = await worker.handle(runtime, content, dequeue_count=1)
    except Exception:
        await poison.handle_poison(runtime, content, dequeue_count=5)
        assert await _occurrences(runtime) == before + 1
    else:
        if result.outcome == "malformed":
            assert await _occurrences(runtime) == before + 1
        else:  # processed: ids billing does not have are dead-lettered as not_found, one occurrence each
            assert await _occurrences(runtime) == before + result.counts["not_found"] + result.counts["invalid"]
    assert _clean(await _dlq_texts(runtime)) == []
    assert _clean(_log_lines(caplog)) == []


def _request(method: str, url: str, body: bytes = b"", **kwargs: Any) -> func.HttpRequest:
    return func.HttpRequest(method, url, body=body, **kwargs)


def _checked(response: func.HttpResponse) -> dict[str, Any]:
    assert 200 <= response.status_code < 500, response.get_body()[:300]
    data = json.loads(response.get_body())
    assert isinstance(data, dict)
    if response.status_code >= 400:
        assert isinstance(data.get("error"), str)
        assert data["error"]
    return data


query_params = st.dictionaries(
    st.sampled_from(["status", "ids", "entity", "run_id", "reason", "top", "body", "code", "all"])
    | st.text(max_size=8),
    st.text(max_size=40),
    max_size=5,
)
selections = st.fixed_dictionaries(
    {"dry_run": st.booleans()},
    optional={"all": st.booleans(), "run_id": ids, "reason": st.text(max_size=20), "ids": st.lists(ids, max_size=3),
              "entity": st.sampled_from(["customers", "invoices"]),
              "status": st.sampled_from(["open", "requeued", "any", "open,resolved"])},
)  # fmt: skip
admin_bodies = st.one_of(
    selections.map(lambda d: json.dumps(d).encode()),
    selections.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    deep.map(str.encode),
    st.fixed_dictionaries(
        {},
        optional=dict.fromkeys(("all", "run_id", "reason", "ids", "entity", "status", "dry_run"), json_values),
    ).map(lambda d: json.dumps({**d, "dry_run": True} if "dry_run" not in d else d).encode()),
)


@FUZZ
@given(params=query_params, body=admin_bodies)
async def test_the_dlq_api_answers_every_input_with_2xx_or_4xx_and_a_json_reason(
    runtime: Runtime, caplog: pytest.LogCaptureFixture, params: dict[str, str], body: bytes
) -> None:
    caplog.set_level(logging.INFO, logger="shared")
    _checked(await dlq_api.list_dlq(runtime, _request("GET", "/api/dlq", params=params)))
    _checked(await dlq_api.reprocess(runtime, _request("POST", "/api/dlq/reprocess", body)))
    _checked(await health.health(runtime))
    assert _clean(_log_lines(caplog)) == []


event_types = st.sampled_from(["invoice.updated", "customer.updated", "invoice.paid", "payout.paid"])
well_formed = st.fixed_dictionaries(
    {"id": st.text(string.ascii_letters + string.digits, min_size=1, max_size=20), "type": event_types,
     "data": st.fixed_dictionaries({"id": ids})},
)  # fmt: skip
events = st.one_of(
    well_formed.map(lambda d: json.dumps(d).encode()),
    well_formed.map(lambda d: json.dumps(d).encode()),  # twice: half the events are well formed
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    deep.map(str.encode),
    st.fixed_dictionaries(
        {"type": event_types | st.text(max_size=20)},
        optional={"id": json_values | ids, "data": st.fixed_dictionaries({}, optional={"id": json_values | ids})},
    ).map(lambda d: json.dumps(d).encode()),
)
timestamps = st.one_of(st.just("now"), st.just("now"), st.text(max_size=15), st.integers(-(10**15), 10**15).map(str))


@FUZZ
@given(event=events, timestamp=timestamps, sign=st.sampled_from([True, True, False]))
async def test_the_webhook_answers_every_input_with_2xx_or_4xx_and_a_json_reason(
    runtime: Runtime, caplog: pytest.LogCaptureFixture, event: bytes, timestamp: str, sign: bool
) -> None:
    caplog.set_level(logging.INFO, logger="shared")
    ts = str(int(time.time())) if timestamp == "now" else timestamp
    signature = webhook.sign(SECRET, ts, event) if sign else "v1=" + "0" * 64
    headers = {"X-Billing-Timestamp": ts, "X-Billing-Signature": signature}
    answer = _checked(await webhook.receive(runtime, _request("POST", "/api/webhooks/billing", event, headers=headers)))
    if answer.get("accepted"):  # the changed id waits in its window for the window's drain (shared.coalesce)
        assert json.loads(event)["data"]["id"] in await coalesce.pending(runtime, answer["window"])
        await runtime.queue.clear_messages()
    assert _clean(_log_lines(caplog)) == []
