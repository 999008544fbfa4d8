"""The tables of the simulated organization, as a customizer would have created them for billing-crm-sync.

Standard tables `account`, `invoice`, `invoicedetail` with their standard columns, the custom `bcs_` columns the
sync writes, a few columns that sales own (never written by the sync), and the alternate keys of the design.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal

ColumnType = Literal["string", "memo", "integer", "decimal", "money", "datetime", "date", "boolean", "lookup", "guid"]


@dataclass(frozen=True)
class Column:
    name: str
    type: ColumnType
    max_length: int | None = None
    required: bool = False
    target: str | None = None  # lookups: the table they point at
    navigation: str | None = None  # lookups: the single-valued navigation property used with @odata.bind
    read_only: bool = False


@dataclass(frozen=True)
class Table:
    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str
    alternate_key: tuple[str, ...]
    columns: tuple[Column, ...]
    bulk_messages: bool = True  # UpsertMultiple/CreateMultiple/UpdateMultiple enabled
    by_name: dict[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {c.name: c for c in self.columns})

    def lookup_by_navigation(self, navigation: str) -> Column | None:
        return next((c for c in self.columns if c.type == "lookup" and c.navigation == navigation), None)


def _system(primary: str) -> tuple[Column, ...]:
    return (
        Column(primary, "guid", read_only=True),
        Column("createdon", "datetime", read_only=True),
        Column("modifiedon", "datetime", read_only=True),
        Column("statecode", "integer"),
        Column("versionnumber", "integer", read_only=True),
    )


ACCOUNT = Table(
    logical_name="account",
    entity_set="accounts",
    primary_id="accountid",
    primary_name="name",
    alternate_key=("accountnumber",),
    columns=(
        *_system("accountid"),
        Column("name", "string", 160, required=True),
        Column("accountnumber", "string", 20),
        Column("emailaddress1", "string", 100),
        Column("telephone1", "string", 50),
        Column("address1_line1", "string", 250),
        Column("address1_city", "string", 80),
        Column("address1_postalcode", "string", 20),
        Column("address1_country", "string", 80),
        Column("bcs_billingstatus", "string", 20),
        Column("bcs_currencycode", "string", 3),
        Column("bcs_balance", "money"),
        Column("bcs_mrr", "money"),
        Column("bcs_golivedate", "date"),
        Column("bcs_providercount", "integer"),
        Column("bcs_productflags", "string", 500),
        Column("bcs_sourceversion", "integer"),
        Column("bcs_sourceupdatedon", "datetime"),
        Column("description", "memo", 2000),  # sales own this one
        Column("websiteurl", "string", 200),  # and this one
    ),
)

INVOICE = Table(
    logical_name="invoice",
    entity_set="invoices",
    primary_id="invoiceid",
    primary_name="name",
    alternate_key=("invoicenumber",),
    columns=(
        *_system("invoiceid"),
        Column("name", "string", 300, required=True),
        Column("invoicenumber", "string", 100),
        Column("customerid", "lookup", target="account", navigation="customerid_account", required=True),
        Column("bcs_billingstatus", "string", 20),
        Column("bcs_currencycode", "string", 3),
        Column("bcs_issuedon", "datetime"),
        Column("duedate", "date"),
        Column("bcs_paidon", "datetime"),
        Column("bcs_subtotal", "money"),
        Column("totaltax", "money"),
        Column("totalamount", "money"),
        Column("bcs_amountpaid", "money"),
        Column("bcs_amountdue", "money"),
        Column("bcs_sourceversion", "integer"),
        Column("bcs_sourceupdatedon", "datetime"),
        Column("description", "memo", 2000),
    ),
)

INVOICE_DETAIL = Table(
    logical_name="invoicedetail",
    entity_set="invoicedetails",
    primary_id="invoicedetailid",
    primary_name="productdescription",
    alternate_key=("bcs_billinglineid",),
    bulk_messages=False,  # like some standard tables, no UpsertMultiple here: clients use $batch
    columns=(
        *_system("invoicedetailid"),
        Column("bcs_billinglineid", "string", 100),
        Column("invoiceid", "lookup", target="invoice", navigation="invoiceid", required=True),
        Column("lineitemnumber", "integer"),
        Column("productdescription", "string", 500),
        Column("bcs_productcode", "string", 100),
        Column("quantity", "decimal"),
        Column("priceperunit", "money"),
        Column("extendedamount", "money"),
        Column("isproductoverridden", "boolean"),
    ),
)

TABLES: dict[str, Table] = {t.logical_name: t for t in (ACCOUNT, INVOICE, INVOICE_DETAIL)}
BY_SET: dict[str, Table] = {t.entity_set: t for t in TABLES.values()}


# ---- amounts: stored as Dataverse stores money (SQL Server `money`: whole ten-thousandths in 64 bits) ----

AMOUNT_KINDS = ("decimal", "money")
AMOUNT_PLACES = 4
AMOUNT_MAX = Decimal("922337203685477")  # Dataverse's largest money value


def stored_amount(value: Decimal | int | float) -> int:
    """An amount as stored: ten-thousandths, rounded half up as SQL Server rounds money. Exact for what a JSON number
    parsed as Decimal carries; ValueError beyond Dataverse's range."""
    amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if not amount.is_finite() or abs(amount) > AMOUNT_MAX:
        raise ValueError(f"{value} is outside the range of a money value")
    return int(amount.quantize(Decimal(1).scaleb(-AMOUNT_PLACES), rounding=ROUND_HALF_UP).scaleb(AMOUNT_PLACES))


def amount_of(stored: int) -> Decimal:
    """A stored amount back as the number the Web API answers."""
    return Decimal(stored).scaleb(-AMOUNT_PLACES)
