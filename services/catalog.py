"""What makes flight, hotel and car different: a catalog, a unit, and a search.

A `CatalogKind` is configuration for the shared participant engine: its name,
the unit it sells, the resources it seeds, and how its search maps onto the
generic availability query `search`.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.participant.store import ParticipantStore


@dataclass(frozen=True)
class SeedResource:
    resource_id: str
    name: str
    price_cents: int
    capacity: int
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CatalogKind:
    """One kind of participant: flight, hotel or car."""

    name: str  # "flight"
    unit: str  # "seat", "room-night", "car-day"
    seed: tuple[SeedResource, ...]


@dataclass(frozen=True)
class Availability:
    resource_id: str
    name: str
    price_cents: int
    attributes: dict[str, str]
    available: int  # the fewest units free on any requested date


# A catalog file (TRIPMESH_CATALOG, --catalog) is JSON:
#   {"start_date": "YYYY-MM-DD", "days": N,
#    "resources": [{"resource_id", "name", "price_cents", "capacity", "attributes"}, ...]}
# start_date and days are optional (default: today, --seed-days). These two
# functions are the only code that knows the format.


def write_catalog_file(
    path: Path, resources: Iterable[SeedResource], start: dt.date, days: int
) -> Path:
    """Write a catalog file that `load_catalog_file` reads back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "start_date": start.isoformat(),
        "days": days,
        "resources": [
            {
                "resource_id": r.resource_id,
                "name": r.name,
                "price_cents": r.price_cents,
                "capacity": r.capacity,
                "attributes": r.attributes,
            }
            for r in resources
        ],
    }
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path


def load_catalog_file(path: Path) -> tuple[tuple[SeedResource, ...], dt.date | None, int | None]:
    """Read a catalog file (the format above)."""
    data: dict[str, Any] = json.loads(path.read_text())
    resources = tuple(
        SeedResource(
            r["resource_id"],
            r.get("name", r["resource_id"]),
            int(r["price_cents"]),
            int(r["capacity"]),
            {k: str(v) for k, v in r.get("attributes", {}).items()},
        )
        for r in data["resources"]
    )
    start = dt.date.fromisoformat(data["start_date"]) if data.get("start_date") else None
    return resources, start, data.get("days")


def seed(
    store: ParticipantStore, resources: tuple[SeedResource, ...], start: dt.date, days: int
) -> bool:
    """Fill an empty database with `resources` on sale for `days` dates; False if not empty."""

    def job(conn: sqlite3.Connection) -> bool:
        if conn.execute("SELECT 1 FROM resources LIMIT 1").fetchone():
            return False
        conn.executemany(
            "INSERT INTO resources (resource_id, name, price_cents, attributes) VALUES (?, ?, ?, ?)",
            [(r.resource_id, r.name, r.price_cents, json.dumps(r.attributes)) for r in resources],
        )
        conn.executemany(
            "INSERT INTO inventory (resource_id, day, capacity, available) VALUES (?, ?, ?, ?)",
            [
                (r.resource_id, (start + dt.timedelta(days=i)).isoformat(), r.capacity, r.capacity)
                for r in resources
                for i in range(days)
            ],
        )
        return True

    return store.db.run_sync(job)


async def search(
    store: ParticipantStore,
    attributes: dict[str, str],
    first: dt.date,
    days: int,
    quantity: int,
) -> list[Availability]:
    """Resources whose attributes match and that have `quantity` free on every date."""
    last = first + dt.timedelta(days=days - 1)

    def job(conn: sqlite3.Connection) -> list[Availability]:
        sql = (
            "SELECT r.resource_id, r.name, r.price_cents, r.attributes,"
            " min(i.available) AS free, count(*) AS n"
            " FROM resources r JOIN inventory i USING (resource_id)"
            " WHERE i.day >= ? AND i.day <= ?"
        )
        args: list[object] = [first.isoformat(), last.isoformat()]
        for key, value in attributes.items():
            if value:
                sql += " AND upper(json_extract(r.attributes, ?)) = upper(?)"
                args += [f"$.{key}", value]
        sql += " GROUP BY r.resource_id HAVING n = ? AND free >= ? ORDER BY r.price_cents"
        rows = conn.execute(sql, (*args, days, quantity))
        return [
            Availability(
                r["resource_id"],
                r["name"],
                r["price_cents"],
                json.loads(r["attributes"]),
                r["free"],
            )
            for r in rows
        ]

    return await store.db.read(job)
