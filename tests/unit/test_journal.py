"""How often the engines write the trip store, and that what they skip is never needed.

A real trip store (temp SQLite file) that also keeps, after each write, the trip
as the file then has it; fake participants.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from coordinator.domain import Decision, LegKind, LegStatus, Protocol, Trip, TripStatus
from coordinator.engine import TripEngine
from coordinator.journal import Change, TripJournal
from coordinator.saga import Saga
from coordinator.store import Told
from coordinator.store.sqlite import SqliteTripStore
from tests.unit.fakes import FakeParticipants
from tests.unit.test_engines import ENGINES, FAST, _request


class WatchedStore(SqliteTripStore):
    """A real store that remembers the trip as the file has it after each write."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.written: list[Trip] = []

    async def write(
        self, trip_id: str, change: Change, now: float, *, tell: Sequence[Told] = ()
    ) -> None:
        await super().write(trip_id, change, now, tell=tell)
        trip = await self.get(trip_id)
        assert trip is not None
        self.written.append(trip)


def _engine(protocol: Protocol, store: SqliteTripStore, fakes: FakeParticipants) -> TripEngine:
    return ENGINES[protocol](store, fakes, FAST)


def _book(tmp_path: Path, protocol: Protocol, arrange=lambda f: None, recover: bool = False):
    async def go():
        log = WatchedStore(tmp_path / "log.db")
        fakes = FakeParticipants()
        arrange(fakes.fakes)
        trip, _ = await log.create(_request(protocol))
        engine = _engine(protocol, log, fakes)
        final = await (engine.recover(trip) if recover else engine.book(trip))
        logged = await log.get(trip.trip_id)
        events = await log.events(trip.trip_id)
        log.close()
        return final, logged, log.written, events, fakes.fakes

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("protocol", "writes"),
    [(Protocol.SAGA, 1), (Protocol.TWO_PHASE_COMMIT, 2), (Protocol.THREE_PHASE_COMMIT, 3)],
)
def test_a_confirmed_trip_writes_after_creation_only_what_recovery_needs(
    tmp_path: Path, protocol: Protocol, writes: int
) -> None:
    final, logged, written, events, _ = _book(tmp_path, protocol)
    assert final.status is TripStatus.CONFIRMED
    # saga: the outcome; 2PC: the decision, then the outcome; 3PC: PRE_COMMIT, COMMIT, outcome.
    assert len(written) == writes
    if protocol is Protocol.THREE_PHASE_COMMIT:
        decisions = [w.decision for w in written]
        assert decisions == [Decision.PRE_COMMIT, Decision.COMMIT, Decision.COMMIT]
        assert {leg.status for leg in written[1].legs} == {LegStatus.PRE_COMMITTED}
    if protocol is Protocol.TWO_PHASE_COMMIT:
        assert written[0].decision is Decision.COMMIT
        assert written[0].status is TripStatus.PENDING
        assert {leg.status for leg in written[0].legs} == {LegStatus.HELD}
    # What the driver answers is exactly what the file says: nothing was re-read.
    assert final == logged
    assert {leg.status for leg in logged.legs} == {LegStatus.CONFIRMED}
    assert all(leg.price_cents == 100 for leg in logged.legs)
    # Every step is still in the timeline, in the order it happened.
    done = "outcome" if protocol is Protocol.SAGA else "acknowledged"
    assert sorted(e.leg for e in events if e.kind == done) == ["car", "flight", "hotel"]
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert events[0].kind == "created" and events[-1].kind == "finished"


def test_a_saga_writes_its_abort_before_the_first_compensation(tmp_path: Path) -> None:
    def arrange(f):
        f[LegKind.CAR].refuse = "sold out"

    final, logged, written, events, _ = _book(tmp_path, Protocol.SAGA, arrange)
    assert final == logged
    assert final.status is TripStatus.ABORTED
    abort, last = written  # the decision, then the outcome
    assert last.status is TripStatus.ABORTED
    assert abort.decision is Decision.ABORT and abort.status is TripStatus.PENDING
    # The abort carries the legs that may hold, so recovery compensates exactly those.
    assert [leg.status for leg in abort.legs] == [
        LegStatus.CONFIRMED,
        LegStatus.CONFIRMED,
        LegStatus.REFUSED,
    ]
    assert [e.leg for e in events if e.kind == "compensation"] == ["hotel", "flight"]


def test_a_retried_step_writes_where_the_trip_stands(tmp_path: Path) -> None:
    def arrange(f):
        f[LegKind.HOTEL].unknown = {"reserve"}

    final, _, written, events, _ = _book(tmp_path, Protocol.SAGA, arrange)
    assert final.status is TripStatus.ABORTED
    # The first write is the first retry of the hotel: the flight's outcome is in it.
    first = written[0]
    assert first.leg(LegKind.FLIGHT).status is LegStatus.CONFIRMED
    assert first.leg(LegKind.HOTEL).status is LegStatus.IN_FLIGHT
    assert first.decision is None
    kinds = [(e.kind, e.leg) for e in events]
    assert kinds.index(("outcome", "flight")) < kinds.index(("retry", "hotel"))


# The protocols the coordinator drives (the choreographed saga's services drive theirs).
@pytest.mark.parametrize("protocol", list(ENGINES))
def test_a_trip_whose_progress_was_never_written_is_finished_by_repeating_it(
    tmp_path: Path, protocol: Protocol
) -> None:
    """A crash after some participant calls but before the next write: the log has the creation
    only (2PC: with no decision). Recovery repeats the calls; the participants answer them as
    before (their reservation ids are in the creation)."""
    final, logged, _, _, fakes = _book(tmp_path, protocol, recover=True)
    assert final == logged
    if protocol is Protocol.SAGA:
        assert final.status is TripStatus.CONFIRMED  # resumed forward
        assert all(("reserve", final.leg(k).reservation_id) in fakes[k].calls for k in fakes)
    else:
        assert final.status is TripStatus.ABORTED  # presumed abort
        assert all(("abort", final.leg(k).reservation_id) in fakes[k].calls for k in fakes)


def test_a_saga_aborted_from_the_log_cancels_legs_the_log_never_saw_taken(tmp_path: Path) -> None:
    """An operator forces compensation of a saga whose driver was lost after two Reserves:
    the log still says NOT_STARTED for them (progress is only noted). Every leg is cancelled."""

    async def go():
        log = SqliteTripStore(tmp_path / "log.db")
        fakes = FakeParticipants()
        trip, _ = await log.create(_request(Protocol.SAGA))
        for kind in (LegKind.FLIGHT, LegKind.HOTEL):  # what the lost driver had done
            await fakes[kind].reserve(
                trip.leg(kind).reservation_id, trip.trip_id, trip.request.leg(kind)
            )
        trip = await TripJournal(log, trip).write(decision=Decision.ABORT, failure_reason="forced")
        final = await Saga(log, fakes, FAST).recover(trip)
        log.close()
        return final, fakes.fakes

    final, fakes = asyncio.run(go())
    assert final.status is TripStatus.ABORTED
    assert all(not fake.held for fake in fakes.values())  # nothing left taken
    assert all(("cancel", final.leg(k).reservation_id) in fakes[k].calls for k in fakes)
