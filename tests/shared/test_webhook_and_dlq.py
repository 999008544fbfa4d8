"""Webhook signatures and timestamps; what the DLQ may store about a person."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import dlq, redact, webhook
from shared.webhook import WebhookRejected

BODY = json.dumps({"id": "evt_1", "type": "invoice.updated", "data": {"id": "in_1", "version": 3}}).encode()
NOW = 1_800_000_000


def headers(secret: str, timestamp: int, body: bytes = BODY) -> dict[str, str]:
    return {"x-billing-timestamp": str(timestamp), "x-billing-signature": webhook.sign(secret, str(timestamp), body)}


def test_a_signed_fresh_event_is_accepted_with_either_secret_during_a_rotation() -> None:
    webhook.verify(BODY, headers("new", NOW), ["new", "old"], tolerance_s=300, now=NOW + 10)
    webhook.verify(BODY, headers("old", NOW), ["new", "old"], tolerance_s=300, now=NOW + 10)
    assert webhook.parse_event(BODY) == webhook.Event("evt_1", "invoices", "in_1")


def signed_at(timestamp: str) -> dict[str, str]:
    return {"x-billing-timestamp": timestamp, "x-billing-signature": webhook.sign("s", timestamp, BODY)}


@pytest.mark.parametrize(
    ("hdrs", "outcome"),
    [
        ({}, "bad_signature"),
        (headers("wrong", NOW), "bad_signature"),
        (headers("s", NOW, b"other body"), "bad_signature"),
        ({"x-billing-timestamp": "soon", "x-billing-signature": "v1=00"}, "bad_signature"),
        (signed_at("\u00b2"), "bad_signature"),  # a superscript two: isdigit() says yes, int() raises
        (signed_at("9" * 5000), "bad_signature"),  # int() refuses more than 4,300 digits
        (signed_at("\u0661\u0667\u0660\u0660"), "bad_signature"),  # Arabic-Indic digits
        (headers("s", NOW - 301), "stale"),
        (headers("s", NOW + 301), "stale"),
    ],
)
def test_bad_signatures_and_stale_timestamps_are_refused(hdrs: dict[str, str], outcome: str) -> None:
    with pytest.raises(WebhookRejected) as info:
        webhook.verify(BODY, hdrs, ["s"], tolerance_s=300, now=NOW)
    assert info.value.status == 401
    assert info.value.outcome == outcome


def test_events_the_sync_does_not_follow_are_ignored_and_broken_ones_refused() -> None:
    assert webhook.parse_event(b'{"type": "payout.created", "data": {"id": "po_1"}}') is None
    with pytest.raises(WebhookRejected, match=r"data\.id"):
        webhook.parse_event(b'{"type": "customer.updated", "data": {}}')
    with pytest.raises(WebhookRejected, match="nested too deep") as info:
        webhook.parse_event(b"[" * 10_000 + b"]" * 10_000)  # RecursionError, a 500, before
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        ("contact jane.doe@clinic.example failed", "j***@clinic.example", "jane.doe"),
        ("owner sean.o'brien@clinic.example rejected", "s***@clinic.example", "o'brien"),
        ("call +1 (555) 123-4567 now", "***4567", "555) 123"),
        ("Authorization: Bearer abc.def.ghi", "Bearer ***", "abc.def"),
        ("api_key=sk_live_123", "api_key=***", "sk_live_123"),
    ],
)
def test_personal_data_and_credentials_are_masked_in_dlq_text(text: str, kept: str, gone: str) -> None:
    masked = redact.mask(text)
    assert kept in masked
    assert gone not in masked


@given(st.emails())
def test_no_email_survives_masking_whole(email: str) -> None:
    local = email.rsplit("@", 1)[0]
    if set(local[1:]) <= {"*"}:  # "*@x.io" masks to "****@x.io", which holds it: nothing of it was shown
        return
    assert email not in redact.mask(f"owner {email} rejected")


@given(st.text(alphabet=st.sampled_from("a\u00e9\u4e2d\U0001f600\x00"), max_size=400), st.integers(1, 300))
def test_dlq_text_is_cut_to_what_a_table_property_holds_in_utf16_units(text: str, units: int) -> None:
    """A Table string property holds 64 KiB of UTF-16: 30,000 emoji are 60,000 units, over it, in 30,000 characters
    (a cap in characters, as before, let them through; Azure refuses such a row, Azurite does not)."""
    cut = dlq._fits(text, units)
    assert len(cut.encode("utf-16-le")) <= 2 * units
    assert text.startswith(cut)
    assert cut == text or len(cut.encode("utf-16-le")) >= 2 * units - 2
