"""What makes flight, hotel and car different: a catalog, a unit, and a search.

A `CatalogKind` is configuration for the shared participant engine: its name,
the unit it sells, the resources it seeds, and how its search maps onto the
generic availability query (`ParticipantStore.search`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.participant.domain import Availability, SeedResource

__all__ = ["Availability", "CatalogKind", "SeedResource", "load_catalog_file"]


@dataclass(frozen=True)
class CatalogKind:
    """One kind of participant: flight, hotel or car."""

    name: str  # "flight"
    unit: str  # "seat", "room-night", "car-day"
    seed: tuple[SeedResource, ...]


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
