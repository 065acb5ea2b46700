"""What the participants sell, cached, so that bad requests are refused before anything is written.

The catalog is small and changes rarely: it is loaded from each participant's
ListResources at start-up and again on a miss (at most once per
`refresh_every` seconds per participant), never per request.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

from coordinator.clients import CatalogEntry, OutcomeUnknown, ParticipantRejected, Participants
from coordinator.domain import LEG_ORDER, CoordinatorError, LegKind, LegRequest, TripRequest
from tripmesh.runtime.errors import ErrorKind, FieldViolation, describe

log = logging.getLogger(__name__)

# The request field that names each leg's resource and its first date.
FIELDS = {
    LegKind.FLIGHT: ("flight.flight_id", "flight.date"),
    LegKind.HOTEL: ("hotel.hotel_id", "hotel.check_in"),
    LegKind.CAR: ("car.car_id", "car.pickup_date"),
}


class Catalog:
    def __init__(self, participants: Participants, *, refresh_every: float = 5.0) -> None:
        self.participants = participants
        self.refresh_every = refresh_every
        self._entries: dict[LegKind, dict[str, CatalogEntry]] = {}
        self._loaded_at: dict[LegKind, float] = {}
        self._locks = {kind: asyncio.Lock() for kind in LEG_ORDER}

    async def load(self) -> None:
        """Best effort at start-up; a participant that is down is asked again on demand."""
        await asyncio.gather(*(self._refresh(kind) for kind in LEG_ORDER), return_exceptions=True)

    async def _refresh(self, kind: LegKind) -> None:
        async with self._locks[kind]:
            # Someone else refreshed while we waited: their answer is ours.
            if time.monotonic() - self._loaded_at.get(kind, -1e9) < self.refresh_every:
                return
            entries = await self.participants[kind].catalog()
            self._entries[kind] = {e.resource_id: e for e in entries}
            self._loaded_at[kind] = time.monotonic()
            log.info("catalog of %s: %d resources", kind.value, len(entries))

    async def _lookup(self, kind: LegKind, resource_id: str) -> CatalogEntry | None:
        entry = self._entries.get(kind, {}).get(resource_id)
        if entry is not None:
            return entry
        try:
            await self._refresh(kind)
        except (OutcomeUnknown, ParticipantRejected) as exc:
            log.warning("catalog of %s not refreshed: %s", kind.value, exc.message)
        if kind not in self._entries:
            # Never loaded: we cannot tell unknown from unreachable, so we may not say NOT_FOUND.
            raise CoordinatorError(
                f"cannot check {FIELDS[kind][0]}: the {kind.value} service is unreachable",
                kind=ErrorKind.UNAVAILABLE,
            )
        return self._entries[kind].get(resource_id)

    async def check(self, request: TripRequest) -> None:
        """NOT_FOUND for an unknown resource, INVALID_ARGUMENT for dates not on sale."""
        missing: list[FieldViolation] = []
        off_sale: list[FieldViolation] = []
        for kind in LEG_ORDER:
            leg: LegRequest = request.leg(kind)
            id_field, date_field = FIELDS[kind]
            entry = await self._lookup(kind, leg.resource_id)
            if entry is None:
                missing.append(
                    FieldViolation(id_field, f"unknown {kind.value} {leg.resource_id!r}")
                )
                continue
            last = _add_days(leg.start_date, leg.days - 1)
            if leg.start_date < entry.first_date or last > entry.last_date:
                off_sale.append(
                    FieldViolation(
                        date_field,
                        f"{leg.resource_id} is on sale from {entry.first_date} to"
                        f" {entry.last_date}; {leg.start_date} to {last} is outside that",
                    )
                )
        if missing:
            raise CoordinatorError(
                describe(missing),
                kind=ErrorKind.NOT_FOUND,
                violations=tuple(missing),
            )
        if off_sale:
            raise CoordinatorError(
                describe(off_sale),
                kind=ErrorKind.INVALID,
                violations=tuple(off_sale),
            )


def _add_days(date: str, days: int) -> str:
    return (dt.date.fromisoformat(date) + dt.timedelta(days=days)).isoformat()
