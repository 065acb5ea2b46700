"""The trip service's promise to a caller that gives up: a trip it has logged is driven.

A real trip store (temp SQLite file) that lingers after writing, fake participants.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from coordinator.catalog import Catalog
from coordinator.domain import Protocol, Trip, TripRequest, TripStatus
from coordinator.metrics import CoordinatorMetrics
from coordinator.saga import Saga
from coordinator.service import TripService
from coordinator.store.sqlite import SqliteTripStore
from coordinator.twopc import TwoPhaseCommit
from tests.unit.fakes import FakeParticipants
from tests.unit.test_engines import FAST, _request


class LingeringStore(SqliteTripStore):
    """A real store whose `create` has written the trip, then takes a while to answer (as a
    database whose COMMIT is acknowledged late): a caller may give up meanwhile."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.written: asyncio.Queue[Trip] = asyncio.Queue()

    async def create(self, request: TripRequest) -> tuple[Trip, bool]:
        trip, replayed = await super().create(request)
        self.written.put_nowait(trip)
        await asyncio.sleep(0.2)
        return trip, replayed


@pytest.mark.parametrize("protocol", [Protocol.SAGA, Protocol.TWO_PHASE_COMMIT])
def test_a_trip_whose_caller_gave_up_while_it_was_logged_is_still_driven_to_its_end(
    tmp_path: Path, protocol: Protocol
) -> None:
    async def go() -> Trip:
        store = LingeringStore(tmp_path / "trips.db")
        fakes = FakeParticipants()
        metrics = CoordinatorMetrics()
        engines = {
            Protocol.TWO_PHASE_COMMIT: TwoPhaseCommit(store, fakes, FAST, metrics),
            Protocol.SAGA: Saga(store, fakes, FAST, metrics),
        }
        service = TripService(store, engines, Catalog(fakes), metrics=metrics)
        try:
            booking = asyncio.ensure_future(service.book(_request(protocol), wait=5.0))
            trip = await store.written.get()
            booking.cancel()  # the client's deadline passed while the trip was being logged
            with pytest.raises(asyncio.CancelledError):
                await booking
            for _ in range(500):  # no sweep runs here: only the trip's own driver can end it
                found = await store.get(trip.trip_id)
                assert found is not None
                if found.status is not TripStatus.PENDING:
                    return found
                await asyncio.sleep(0.01)
            return found
        finally:
            await service.stop()
            store.close()

    ended = asyncio.run(go())
    assert ended.status is TripStatus.CONFIRMED
