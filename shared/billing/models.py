"""The billing platform's records as our contract with it. A record that breaks it becomes an InvalidRecord."""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from shared.errors import InvalidRecord

# ISO 4217 active codes (2024).
CURRENCIES = frozenset(
    """AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP BYN BZD CAD CDF CHF
    CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG
    HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA
    MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD
    RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX
    USD UYU UZS VES VND VUV WST XAF XCD XOF XPF YER ZAR ZMW ZWL""".split()  # noqa: SIM905 - a table is easier to audit than 160 lines
)
MAX_NAME = 160
_MONEY = re.compile(r"^-?\d{1,15}(\.\d{1,4})?$")


def _decimal_string(value: Any) -> Decimal:
    """Money and quantities arrive as decimal strings; a JSON float would already have lost cents."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("must be a decimal string")  # noqa: TRY004 - pydantic wants ValueError
    text = str(value).strip()
    if not _MONEY.match(text):
        raise ValueError(f"{text[:20]!r} is not a decimal amount")
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{text[:20]!r} is not a decimal amount") from None


def _currency(value: str) -> str:
    if value not in CURRENCIES:
        raise ValueError(f"{value[:8]!r} is not an ISO 4217 currency code")
    return value


def _non_negative(value: Decimal) -> Decimal:
    if value < 0:
        raise ValueError("must not be negative")
    return value


Money = Annotated[Decimal, BeforeValidator(_decimal_string)]
Quantity = Annotated[Decimal, BeforeValidator(_decimal_string), AfterValidator(_non_negative)]
Currency = Annotated[str, AfterValidator(_currency)]
Id = Annotated[str, Field(min_length=1, max_length=100)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)


class Address(_Record):
    line1: str | None = None
    city: str | None = None
    postal_code: str | None = None
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")] | None = None


class Customer(_Record):
    id: Id
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
    email: str | None = None
    phone: str | None = None
    address: Address | None = None
    status: Literal["active", "suspended", "churned"]
    currency: Currency
    balance: Money
    mrr: Money
    go_live_date: date | None = None
    provider_count: Annotated[int, Field(ge=0)] = 0
    product_flags: tuple[str, ...] = ()
    created_at: datetime
    updated_at: datetime
    version: Annotated[int, Field(ge=1)]


class InvoiceLine(_Record):
    id: Id
    position: int = 0
    description: str | None = None
    product_code: str | None = None
    quantity: Quantity
    unit_price: Money
    amount: Money


class Invoice(_Record):
    id: Id
    number: Annotated[str, Field(min_length=1, max_length=100)]
    customer_id: Id
    status: Literal["draft", "open", "paid", "void", "uncollectible"]
    currency: Currency
    issued_at: datetime | None = None
    due_at: datetime | None = None
    paid_at: datetime | None = None
    subtotal: Money
    tax: Money
    total: Money
    amount_paid: Money
    amount_due: Money
    lines: tuple[InvoiceLine, ...] = ()
    created_at: datetime
    updated_at: datetime
    version: Annotated[int, Field(ge=1)]


class Light(_Record):
    """What a light listing (`fields=id,updated_at,version`) gives for each record. Its id is taken as long as a
    listing position can hold it: one the queue contract refuses is dead-lettered by fan-out, and the listing goes
    on (a 101-character id here failed the run at the same page, tick after tick)."""

    id: Annotated[str, Field(min_length=1, max_length=1000)]  # pagination.MAX_LISTED_ID
    updated_at: str
    version: int | None = None


Entity = Literal["customers", "invoices"]
Record = Customer | Invoice
MODELS: dict[str, type[Customer] | type[Invoice]] = {"customers": Customer, "invoices": Invoice}


def describe(exc: ValidationError) -> str:
    """`field.path: what is wrong` for each problem; never the offending value in full."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "(record)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_record(entity: Entity, raw: Any) -> Record | InvalidRecord:
    """A validated record, or an InvalidRecord whose reason names every field that is wrong."""
    record_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
    if not isinstance(raw, dict):
        return InvalidRecord(entity, None, f"(record): expected an object, got {type(raw).__name__}")
    try:
        return MODELS[entity].model_validate(raw)
    except ValidationError as exc:
        return InvalidRecord(entity, record_id, describe(exc))
