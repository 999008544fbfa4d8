"""The simulator's data: generated deterministically from a seed, kept in SQLite, mutated in the background.

Tables (`sqlite3 F` to inspect a run kept with `--db F`): `customers`, `invoices`, `invoice_lines`; columns are
named as in the API. Timestamps are ISO 8601 UTC with microseconds, so text order is time order.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from faker import Faker

Entity = Literal["customers", "invoices"]
ENTITIES: tuple[Entity, ...] = ("customers", "invoices")
CURRENCIES = ("USD", "EUR", "GBP", "CAD", "AUD")
ANCHOR = datetime(2025, 1, 1, tzinfo=UTC)  # generated history ends here; mutations use the real clock
CENT = Decimal("0.01")
MAX_NAME = 160

_SCHEMA = """
CREATE TABLE IF NOT EXISTS customers (
    id TEXT PRIMARY KEY, name TEXT, email TEXT, phone TEXT, address TEXT, status TEXT, currency TEXT,
    balance TEXT, mrr TEXT, go_live_date TEXT, provider_count INTEGER, product_flags TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS customers_updated ON customers (updated_at, id);
CREATE TABLE IF NOT EXISTS invoices (
    id TEXT PRIMARY KEY, number TEXT, customer_id TEXT, status TEXT, currency TEXT, issued_at TEXT, due_at TEXT,
    paid_at TEXT, subtotal TEXT, tax TEXT, total TEXT, amount_paid TEXT, amount_due TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS invoices_updated ON invoices (updated_at, id);
CREATE TABLE IF NOT EXISTS invoice_lines (
    id TEXT PRIMARY KEY, invoice_id TEXT NOT NULL, position INTEGER NOT NULL, description TEXT,
    product_code TEXT, quantity TEXT, unit_price TEXT, amount TEXT
);
CREATE INDEX IF NOT EXISTS lines_invoice ON invoice_lines (invoice_id, position);
"""
PRODUCTS = {
    "SCHED-PRO": ("Scheduling Pro seat", Decimal("49.00")),
    "SCHED-ENT": ("Scheduling Enterprise seat", Decimal("89.00")),
    "SMS-PACK": ("SMS reminders pack (1,000)", Decimal("15.00")),
    "TELEHEALTH": ("Telehealth add-on", Decimal("120.00")),
    "ONBOARD": ("Onboarding and data migration", Decimal("750.00")),
    "SUPPORT-24": ("24/7 premium support", Decimal("199.00")),
}
FLAGS = ("scheduling", "sms", "telehealth", "payments", "analytics", "api")


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def money(value: Decimal) -> str:
    return str(value.quantize(CENT))


class _Pools:
    """Realistic values drawn once from Faker and then combined by the seeded PRNG: Faker per record is slow."""

    def __init__(self, seed: int, size: int) -> None:
        fake = Faker(["en_US", "en_GB", "de_DE", "fr_FR", "en_CA"])
        fake.seed_instance(seed)
        self.companies = [fake.company() for _ in range(size)]
        self.suffixes = ["Clinic", "Health", "Dental", "Physio", "Practice", "Group", "Care", "Medical"]
        self.domains = [fake.domain_name() for _ in range(size)]
        self.phones = [fake.phone_number() for _ in range(size)]
        self.streets = [fake.street_address() for _ in range(size)]
        self.cities = [fake.city() for _ in range(size)]
        self.postcodes = [fake.postcode() for _ in range(size)]


class Store:
    """Thread-safe SQLite store. Every write bumps `version` and sets `updated_at` strictly later than before."""

    def __init__(self, db: Path | None = None) -> None:
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(db) if db else ":memory:", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_SCHEMA)
        self._last_stamp = ANCHOR

    # ---- generation ----

    def seed(self, *, invoices: int, seed: int, invalid_rate: float = 0.0) -> None:
        """Generate `invoices` invoices and invoices/4 customers (at least one), repeatably for a seed."""
        rng = random.Random(f"billing-data:{seed}")
        n_customers = max(1, invoices // 4)
        pools = _Pools(seed, size=min(n_customers, 400))
        customers = [self._new_customer(i, rng, pools, invalid_rate) for i in range(n_customers)]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO customers VALUES (:id, :name, :email, :phone, :address, :status, :currency,"
                " :balance, :mrr, :go_live_date, :provider_count, :product_flags, :created_at, :updated_at, :version)",
                customers,
            )
            for i in range(invoices):
                invoice, lines = self._new_invoice(i, rng, customers, invalid_rate)
                self._db.execute(
                    "INSERT OR REPLACE INTO invoices VALUES (:id, :number, :customer_id, :status, :currency,"
                    " :issued_at, :due_at, :paid_at, :subtotal, :tax, :total, :amount_paid, :amount_due,"
                    " :created_at, :updated_at, :version)",
                    invoice,
                )
                self._db.executemany(
                    "INSERT OR REPLACE INTO invoice_lines VALUES (:id, :invoice_id, :position, :description,"
                    " :product_code, :quantity, :unit_price, :amount)",
                    lines,
                )
            self._db.execute("COMMIT")

    @staticmethod
    def _stamp(rng: random.Random, *, days_back: int) -> datetime:
        return ANCHOR - timedelta(seconds=rng.randint(1, days_back * 86400), microseconds=rng.randint(0, 999_999))

    def _new_customer(self, i: int, rng: random.Random, pools: _Pools, invalid_rate: float) -> dict[str, Any]:
        created = self._stamp(rng, days_back=730)
        updated = created + (ANCHOR - created) * rng.random()
        country = rng.choice(["US", "GB", "DE", "FR", "CA", "IE", "NL", "AU"])
        currency = {"US": "USD", "GB": "GBP", "CA": "CAD", "AU": "AUD"}.get(country, "EUR")
        name = f"{rng.choice(pools.companies)} {rng.choice(pools.suffixes)}"
        if rng.random() < invalid_rate:  # a record that breaks the billing contract
            if rng.random() < 0.5:
                currency = "XYZ"
            else:
                name = (name + " ") * (MAX_NAME // max(1, len(name)) + 2)
        return {
            "id": f"cus_{i:07d}{rng.randrange(16**4):04x}",
            "name": name,
            "email": f"billing{i}@{rng.choice(pools.domains)}",
            "phone": rng.choice(pools.phones),
            "address": json.dumps(
                {
                    "line1": rng.choice(pools.streets),
                    "city": rng.choice(pools.cities),
                    "postal_code": rng.choice(pools.postcodes),
                    "country": country,
                }
            ),
            "status": rng.choices(["active", "suspended", "churned"], weights=[85, 5, 10])[0],
            "currency": currency,
            "balance": money(Decimal(rng.randint(0, 500_000)) / 100),
            "mrr": money(Decimal(rng.randint(4_900, 2_500_000)) / 100),
            "go_live_date": (created.date() + timedelta(days=rng.randint(7, 90))).isoformat(),
            "provider_count": rng.randint(1, 250),
            "product_flags": json.dumps(sorted(rng.sample(FLAGS, rng.randint(1, 4)))),
            "created_at": iso(created),
            "updated_at": iso(updated),
            "version": rng.randint(1, 12),
        }

    def _new_invoice(
        self, i: int, rng: random.Random, customers: Sequence[dict[str, Any]], invalid_rate: float
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        customer = rng.choice(customers)
        issued = self._stamp(rng, days_back=365)
        updated = issued + (ANCHOR - issued) * rng.random()
        invoice_id = f"in_{i:08d}{rng.randrange(16**4):04x}"
        currency: str | None = customer["currency"] if customer["currency"] in CURRENCIES else "USD"
        customer_id: str | None = customer["id"]
        lines: list[dict[str, Any]] = []
        for pos in range(rng.randint(1, 5)):
            code = rng.choice(list(PRODUCTS))
            description, price = PRODUCTS[code]
            quantity = Decimal(rng.randint(1, 40))
            lines.append(
                {
                    "id": f"il_{i:08d}_{pos}",
                    "invoice_id": invoice_id,
                    "position": pos,
                    "description": description,
                    "product_code": code,
                    "quantity": str(quantity),
                    "unit_price": money(price),
                    "amount": money(price * quantity),
                }
            )
        if rng.random() < invalid_rate:
            defect = rng.choice(["negative_quantity", "unknown_currency", "missing_customer"])
            if defect == "negative_quantity":
                lines[0]["quantity"] = str(-abs(Decimal(lines[0]["quantity"])))
                lines[0]["amount"] = money(Decimal(lines[0]["unit_price"]) * Decimal(lines[0]["quantity"]))
            elif defect == "unknown_currency":
                currency = "ABC"
            else:
                customer_id = None
        status = rng.choices(["draft", "open", "paid", "void", "uncollectible"], weights=[5, 25, 62, 5, 3])[0]
        invoice = {
            "id": invoice_id,
            "number": f"INV-{issued.year}-{i:07d}",
            "customer_id": customer_id,
            "status": status,
            "currency": currency,
            "issued_at": iso(issued),
            "due_at": iso(issued + timedelta(days=30)),
            "paid_at": None,
            "created_at": iso(issued),
            "updated_at": iso(updated),
            "version": rng.randint(1, 6),
        }
        self._totals(invoice, lines)
        if status == "paid":
            invoice["paid_at"] = iso(min(updated, issued + timedelta(days=rng.randint(1, 40))))
            invoice["amount_paid"], invoice["amount_due"] = invoice["total"], "0.00"
        return invoice, lines

    @staticmethod
    def _totals(invoice: dict[str, Any], lines: Iterable[dict[str, Any]]) -> None:
        subtotal = sum((Decimal(line["amount"]) for line in lines), Decimal(0))
        tax = (subtotal * Decimal("0.2")).quantize(CENT)
        invoice["subtotal"], invoice["tax"], invoice["total"] = money(subtotal), money(tax), money(subtotal + tax)
        paid = Decimal(invoice.get("amount_paid") or 0)
        invoice["amount_paid"] = money(paid)
        invoice["amount_due"] = money(subtotal + tax - paid)

    # ---- reads ----

    def count(self, entity: Entity, since: str) -> int:
        with self._lock:
            row = self._db.execute(f"SELECT COUNT(*) FROM {entity} WHERE updated_at >= ?", (since,)).fetchone()  # noqa: S608
            return int(row[0])

    def list_after(self, entity: Entity, since: str, after: tuple[str, str] | None, limit: int) -> list[sqlite3.Row]:
        """Keyset page ordered by (updated_at, id): the cursor mode."""
        with self._lock:
            if after is None:
                sql = f"SELECT * FROM {entity} WHERE updated_at >= ? ORDER BY updated_at, id LIMIT ?"  # noqa: S608
                return list(self._db.execute(sql, (since, limit)))
            sql = (
                f"SELECT * FROM {entity} WHERE updated_at >= ? AND (updated_at, id) > (?, ?) "  # noqa: S608
                "ORDER BY updated_at, id LIMIT ?"
            )
            return list(self._db.execute(sql, (since, after[0], after[1], limit)))

    def list_offset(self, entity: Entity, since: str, offset: int, limit: int) -> list[sqlite3.Row]:
        """Offset page ordered by updated_at: a record that changes moves to the end, shifting the rest."""
        with self._lock:
            sql = f"SELECT * FROM {entity} WHERE updated_at >= ? ORDER BY updated_at, id LIMIT ? OFFSET ?"  # noqa: S608
            return list(self._db.execute(sql, (since, limit, offset)))

    def get_many(self, entity: Entity, ids: Sequence[str]) -> list[sqlite3.Row]:
        with self._lock:
            marks = ",".join("?" * len(ids))
            return list(self._db.execute(f"SELECT * FROM {entity} WHERE id IN ({marks})", list(ids)))  # noqa: S608

    def lines_of(self, invoice_ids: Sequence[str]) -> dict[str, list[sqlite3.Row]]:
        out: dict[str, list[sqlite3.Row]] = {i: [] for i in invoice_ids}
        with self._lock:
            marks = ",".join("?" * len(invoice_ids))
            sql = f"SELECT * FROM invoice_lines WHERE invoice_id IN ({marks}) ORDER BY invoice_id, position"  # noqa: S608
            for row in self._db.execute(sql, list(invoice_ids)):
                out[row["invoice_id"]].append(row)
        return out

    def all_ids(self, entity: Entity) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(f"SELECT id FROM {entity} ORDER BY id")]  # noqa: S608

    def versions(self, entity: Entity) -> dict[str, int]:
        with self._lock:
            return {r[0]: r[1] for r in self._db.execute(f"SELECT id, version FROM {entity}")}  # noqa: S608

    def table_counts(self) -> dict[str, int]:
        with self._lock:
            return {
                t: int(self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])  # noqa: S608
                for t in ("customers", "invoices", "invoice_lines")
            }

    # ---- writes ----

    def _next_stamp(self) -> str:
        now = datetime.now(UTC)
        self._last_stamp = max(now, self._last_stamp + timedelta(microseconds=1))
        return iso(self._last_stamp)

    def mutate(self, entity: Entity, ids: Sequence[str], rng: random.Random) -> list[tuple[str, int]]:
        """Change each record the way the platform's users do; returns (id, new version)."""
        changed = []
        with self._lock:
            self._db.execute("BEGIN")
            for record_id in ids:
                row = self._db.execute(f"SELECT * FROM {entity} WHERE id = ?", (record_id,)).fetchone()  # noqa: S608
                if row is None:
                    continue
                values = dict(row)
                if entity == "customers":
                    self._mutate_customer(values, rng)
                else:
                    self._mutate_invoice(values, rng)
                values["version"] += 1
                values["updated_at"] = self._next_stamp()
                cols = [c for c in values if c != "id"]
                assignments = ", ".join(f"{c} = :{c}" for c in cols)
                self._db.execute(f"UPDATE {entity} SET {assignments} WHERE id = :id", values)  # noqa: S608
                changed.append((record_id, int(values["version"])))
            self._db.execute("COMMIT")
        return changed

    @staticmethod
    def _mutate_customer(values: dict[str, Any], rng: random.Random) -> None:
        what = rng.choice(["balance", "mrr", "status", "phone", "providers"])
        if what == "balance":
            values["balance"] = money(Decimal(rng.randint(0, 500_000)) / 100)
        elif what == "mrr":
            values["mrr"] = money(Decimal(values["mrr"]) * Decimal(rng.choice(["1.05", "0.95", "1.10"])))
        elif what == "status":
            values["status"] = rng.choice(["active", "suspended", "churned"])
        elif what == "phone":
            values["phone"] = f"+1-555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
        else:
            values["provider_count"] = max(1, int(values["provider_count"]) + rng.randint(-5, 10))

    def _mutate_invoice(self, values: dict[str, Any], rng: random.Random) -> None:
        lines = [dict(r) for r in self.lines_of([values["id"]])[values["id"]]]
        what = rng.choice(["pay", "quantity", "add_line", "remove_line"]) if values["status"] != "paid" else "quantity"
        if what == "pay":
            values["status"], values["paid_at"] = "paid", self._next_stamp()
            values["amount_paid"] = values["total"]
        elif what == "quantity" and lines:
            line = rng.choice(lines)
            quantity = Decimal(line["quantity"]) + rng.randint(1, 5)
            line["quantity"], line["amount"] = str(quantity), money(Decimal(line["unit_price"]) * quantity)
        elif what == "add_line":
            code = rng.choice(list(PRODUCTS))
            description, price = PRODUCTS[code]
            position = max((line["position"] for line in lines), default=-1) + 1
            lines.append(
                {
                    "id": f"il_{values['id'][3:]}_{position}",
                    "invoice_id": values["id"],
                    "position": position,
                    "description": description,
                    "product_code": code,
                    "quantity": "1",
                    "unit_price": money(price),
                    "amount": money(price),
                }
            )
        elif what == "remove_line" and len(lines) > 1:
            lines.pop(rng.randrange(len(lines)))
        self._db.execute("DELETE FROM invoice_lines WHERE invoice_id = ?", (values["id"],))
        self._db.executemany(
            "INSERT INTO invoice_lines VALUES (:id, :invoice_id, :position, :description, :product_code, :quantity,"
            " :unit_price, :amount)",
            lines,
        )
        self._totals(values, lines)
        if values["status"] == "paid":
            values["amount_paid"], values["amount_due"] = values["total"], "0.00"

    def restore(self, entity: Entity, row: dict[str, Any]) -> None:
        """Put a record back as it was (a row from `get_many`): a fault for tests, a stale replica's answer."""
        with self._lock:
            cols = ", ".join(row)
            marks = ", ".join(f":{c}" for c in row)
            self._db.execute(f"INSERT OR REPLACE INTO {entity} ({cols}) VALUES ({marks})", row)  # noqa: S608

    def close(self) -> None:
        with self._lock:
            self._db.close()


def to_api(entity: Entity, row: sqlite3.Row, lines: Sequence[sqlite3.Row] | None = None) -> dict[str, Any]:
    record = dict(row)
    if entity == "customers":
        record["address"] = json.loads(record["address"]) if record["address"] else None
        record["product_flags"] = json.loads(record["product_flags"]) if record["product_flags"] else []
    else:
        record["lines"] = [{k: v for k, v in dict(line).items() if k not in ("invoice_id",)} for line in lines or []]
    return record


def today() -> date:
    return datetime.now(UTC).date()
