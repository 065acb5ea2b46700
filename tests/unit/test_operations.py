"""Operator actions racing a driver that finishes the same trip.

A real trip store (temp SQLite file) whose reads can be paused, fake
participants. The race the actions must win: a 2PC trip shows NEEDS_ATTENTION
while its phase 2 is slow, an operator acts on it, and meanwhile the driver's
phase 2 lands and the trip is CONFIRMED. Whatever the interleaving, an older
status must never be written over the newer one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from coordinator.catalog import Catalog
from coordinator.domain import CoordinatorError, LegKind, Protocol, Trip, TripRequest, TripStatus
from coordinator.metrics import CoordinatorMetrics
from coordinator.operations import OperatorActions
from coordinator.saga import Saga
from coordinator.service import TripService
from coordinator.store.sqlite import SqliteTripStore
from coordinator.twopc import TwoPhaseCommit
from tests.unit.fakes import FakeParticipants
from tests.unit.test_engines import FAST, _request


def _service(store: SqliteTripStore, fakes: FakeParticipants) -> TripService:
    """A trip service over `store` and `fakes` that books 2PC and saga trips."""
    metrics = CoordinatorMetrics()
    engines = {
        Protocol.TWO_PHASE_COMMIT: TwoPhaseCommit(store, fakes, FAST, metrics),
        Protocol.SAGA: Saga(store, fakes, FAST, metrics),
    }
    return TripService(store, engines, Catalog(fakes), metrics=metrics)


class PausingStore(SqliteTripStore):
    """A real store whose next `get`, once armed, reads and then waits until released
    before it answers (so that what it answers may be overtaken meanwhile)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.armed = False
        self.paused = asyncio.Event()
        self.release = asyncio.Event()

    async def get(self, trip_id: str) -> Trip | None:
        found = await super().get(trip_id)
        if self.armed:
            self.armed = False
            self.paused.set()
            await self.release.wait()
        return found


ACTIONS = {
    "retry": lambda a, t: a.retry(t, "alice", "try again", wait=1.0),
    "force_compensation": lambda a, t: a.force_compensation(t, "alice", "give up", wait=1.0),
    "mark_resolved": lambda a, t: a.mark_resolved(t, "alice", "fixed by hand"),
}


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_an_action_racing_a_finishing_driver_never_overwrites_its_status(
    tmp_path: Path, action: str
) -> None:
    async def go() -> tuple[object, Trip, list[str]]:
        store = PausingStore(tmp_path / "trips.db")
        fakes = FakeParticipants()
        fakes.fakes[LegKind.CAR].unknown = {"commit"}  # phase 2 is slow at the car
        service = _service(store, fakes)
        actions = OperatorActions(service, fakes)
        trip, _ = await service.book(_request(Protocol.TWO_PHASE_COMMIT), wait=0)
        while (await store.get(trip.trip_id)).status is not TripStatus.NEEDS_ATTENTION:  # type: ignore[union-attr]
            await asyncio.sleep(0.01)
        driver = service._active[trip.trip_id]  # still retrying the car's Commit

        # The operator acts; any read of the trip it makes waits until the driver is done.
        store.armed = True
        acting = asyncio.ensure_future(ACTIONS[action](actions, trip.trip_id))
        await asyncio.wait(
            [acting, asyncio.ensure_future(store.paused.wait())],
            timeout=1.0,
            return_when=asyncio.FIRST_COMPLETED,
        )
        fakes.fakes[LegKind.CAR].unknown = set()  # the Commit lands: the driver finishes
        finished = await asyncio.wait_for(driver, 5)
        assert finished is not None and finished.status is TripStatus.CONFIRMED
        store.release.set()
        try:
            outcome: object = await asyncio.wait_for(acting, 5)
        except CoordinatorError as exc:
            outcome = exc
        final = await store.get(trip.trip_id)
        assert final is not None
        events = [e.kind for e in await store.events(trip.trip_id)]
        await service.stop()
        store.close()
        return outcome, final, events

    outcome, final, events = asyncio.run(go())
    assert final.status is TripStatus.CONFIRMED
    assert final.attention is None
    assert not [kind for kind in events if kind.startswith("operator-")], events
    assert isinstance(outcome, CoordinatorError), outcome
    assert outcome.kind.name == "PRECONDITION"


class CreatePausingStore(SqliteTripStore):
    """A real store whose `create` writes the trip, then waits to be released before it
    answers: the moment in which the trip is in the store but has no driver yet."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.created = asyncio.Event()
        self.release = asyncio.Event()
        self.written: Trip | None = None

    async def create(self, request: TripRequest) -> tuple[Trip, bool]:
        found = await super().create(request)
        self.written = found[0]
        self.created.set()
        await self.release.wait()
        return found


@pytest.mark.parametrize("protocol", [Protocol.TWO_PHASE_COMMIT, Protocol.SAGA])
def test_the_sweeper_never_drives_a_trip_book_is_starting(
    tmp_path: Path, protocol: Protocol
) -> None:
    """A chaos run found a 2PC trip driven twice: the sweeper read it between its write
    and its driver's start, presumed it aborted, while `book` prepared and committed it."""

    async def go() -> tuple[Trip, list[object], list[str], list[tuple[str, str]]]:
        store = CreatePausingStore(tmp_path / "trips.db")
        fakes = FakeParticipants()
        service = _service(store, fakes)
        booking = asyncio.ensure_future(service.book(_request(protocol), wait=5))
        await store.created.wait()
        swept = await service.resume_unfinished()  # the housekeeping round, in that moment
        store.release.set()
        trip, _ = await booking
        events = [e.kind for e in await store.events(trip.trip_id)]
        calls = [call for fake in fakes.fakes.values() for call in fake.calls]
        await service.stop()
        store.close()
        return trip, list(swept), events, calls

    trip, swept, events, calls = asyncio.run(go())
    assert swept == []
    assert trip.status is TripStatus.CONFIRMED, trip
    assert "recovery" not in events, events
    methods = sorted(method for method, _ in calls if method != "catalog")
    expected = (
        ["commit"] * 3 + ["prepare"] * 3
        if protocol is Protocol.TWO_PHASE_COMMIT
        else ["reserve"] * 3
    )
    assert methods == expected


@pytest.mark.parametrize("protocol", [Protocol.TWO_PHASE_COMMIT, Protocol.SAGA])
def test_a_trip_whose_caller_gave_up_while_it_was_logged_is_still_driven_to_its_end(
    tmp_path: Path, protocol: Protocol
) -> None:
    """A client whose deadline passes while its trip is being logged cancels BookTrip. The
    trip is in the log by then: it must get its driver (on PostgreSQL this replica holds
    its lease, so no other would ever drive it)."""

    async def go() -> Trip | None:
        store = CreatePausingStore(tmp_path / "trips.db")
        service = _service(store, FakeParticipants())
        try:
            booking = asyncio.ensure_future(service.book(_request(protocol), wait=5))
            await store.created.wait()
            booking.cancel()  # the client's deadline passes while the trip is logged
            with pytest.raises(asyncio.CancelledError):
                await booking
            store.release.set()
            assert store.written is not None
            for _ in range(500):  # no sweep runs here: only the trip's own driver ends it
                found = await store.get(store.written.trip_id)
                if found is None or found.status is not TripStatus.PENDING:
                    return found
                await asyncio.sleep(0.01)
            return found
        finally:
            await service.stop()
            store.close()

    ended = asyncio.run(go())
    assert ended is not None and ended.status is TripStatus.CONFIRMED, ended
