"""The coordinator's side of the choreographed saga, as pure functions and a real store:
what each event does to a trip, what a quiet trip is waiting for, and the trip store's
upgrade to the schema that knows the protocol."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import replace
from functools import reduce
from pathlib import Path

import pytest

from coordinator.choreography import EventFollower, change_for, plan_of, stuck_detail
from coordinator.domain import (
    Attention,
    Decision,
    LegKind,
    LegRequest,
    LegStatus,
    Protocol,
    Trip,
    TripEvent,
    TripRequest,
    TripStatus,
)
from coordinator.store.sqlite import TRIPS_TABLE, SqliteTripStore
from tripmesh.runtime import broker
from tripmesh.v1 import events_pb2 as epb

K = epb.SagaEventKind


def _request(key: str = "k") -> TripRequest:
    leg = LegRequest("X", "2030-01-01", 2, 1)
    return TripRequest(key, "c", Protocol.CHOREOGRAPHY, leg, leg, leg)


def _created(tmp_path: Path) -> tuple[SqliteTripStore, Trip]:
    store = SqliteTripStore(tmp_path / "trips.db")
    trip, _ = asyncio.run(store.create(_request()))
    return store, trip


def _event(trip: Trip, kind: int, source: str, reason: str = "", price: int = 0) -> epb.SagaEvent:
    return broker.new_event(
        kind, plan_of(trip), source=source, reservation_id="r", reason=reason, price_cents=price
    )


def _apply(trip: Trip, *events: epb.SagaEvent) -> Trip:
    def step(t: Trip, e: epb.SagaEvent) -> Trip:
        change = change_for(t, e)
        return t if change is None else change.apply(t, time.time())

    return reduce(step, events, trip)


def test_the_plan_carries_each_legs_hold(tmp_path: Path) -> None:
    store, trip = _created(tmp_path)
    plan = plan_of(trip)
    assert plan.trip_id == trip.trip_id
    assert (plan.car.resource_id, plan.car.start_date, plan.car.days) == ("X", "2030-01-01", 2)
    store.close()


def test_events_book_a_trip_and_a_repeated_event_changes_nothing(tmp_path: Path) -> None:
    store, trip = _created(tmp_path)
    flight = _event(trip, K.SAGA_EVENT_KIND_FLIGHT_RESERVED, "flight", price=120_000)
    assert change_for(trip, _event(trip, K.SAGA_EVENT_KIND_TRIP_REQUESTED, "coordinator")) is None
    after_flight = _apply(trip, flight)
    assert after_flight.leg(LegKind.FLIGHT).status is LegStatus.CONFIRMED
    assert after_flight.leg(LegKind.FLIGHT).price_cents == 120_000
    assert after_flight.status is TripStatus.PENDING
    assert change_for(after_flight, flight) is None  # redelivered: already written
    done = _apply(
        after_flight,
        _event(trip, K.SAGA_EVENT_KIND_HOTEL_RESERVED, "hotel", price=90_000),
        _event(trip, K.SAGA_EVENT_KIND_CAR_RESERVED, "car", price=16_000),
    )
    assert (done.status, done.decision) == (TripStatus.CONFIRMED, Decision.COMMIT)
    change = change_for(after_flight, _event(trip, K.SAGA_EVENT_KIND_HOTEL_RESERVED, "hotel"))
    assert change is not None
    (line,) = change.events
    assert (line.kind, line.leg, line.actor) == ("hotel_reserved", "hotel", "hotel")
    assert line.detail == "to flight_reserved"
    store.close()


def test_a_refusal_turns_the_trip_back_and_the_flights_cancellation_ends_it(
    tmp_path: Path,
) -> None:
    store, trip = _created(tmp_path)
    refused = _apply(
        trip,
        _event(trip, K.SAGA_EVENT_KIND_FLIGHT_RESERVED, "flight"),
        _event(trip, K.SAGA_EVENT_KIND_HOTEL_RESERVED, "hotel"),
        _event(trip, K.SAGA_EVENT_KIND_CAR_REFUSED, "car", reason="sold out: none left"),
    )
    assert (refused.status, refused.decision) == (TripStatus.PENDING, Decision.ABORT)
    ended = _apply(
        refused,
        _event(trip, K.SAGA_EVENT_KIND_HOTEL_CANCELLED, "hotel"),
        _event(trip, K.SAGA_EVENT_KIND_FLIGHT_CANCELLED, "flight"),
    )
    assert ended.status is TripStatus.ABORTED
    assert ended.failure_reason == "car: sold out: none left"
    assert [leg.status for leg in ended.legs] == [
        LegStatus.CANCELLED,
        LegStatus.CANCELLED,
        LegStatus.REFUSED,
    ]
    # The flight refused at once: nothing to undo, the trip ends there.
    first = _apply(trip, _event(trip, K.SAGA_EVENT_KIND_FLIGHT_REFUSED, "flight", reason="full"))
    assert (first.status, first.failure_reason) == (TripStatus.ABORTED, "flight: full")
    store.close()


def test_events_out_of_order_end_the_trip_only_when_it_is_undone(tmp_path: Path) -> None:
    """JetStream delivers an unacknowledged event again after its ack wait, behind newer
    ones: a coordinator killed while it held FLIGHT_RESERVED, HOTEL_RESERVED and CAR_REFUSED
    gets, once restarted, the cancellations first (seen in a chaos run: black-friday,
    seed 3, where the trip then stayed stuck with its legs shown reserved)."""
    store, trip = _created(tmp_path)
    k = K
    cancelled_first = _apply(
        trip,
        _event(trip, k.SAGA_EVENT_KIND_HOTEL_CANCELLED, "hotel"),
        _event(trip, k.SAGA_EVENT_KIND_FLIGHT_CANCELLED, "flight"),
    )
    assert cancelled_first.status is TripStatus.PENDING  # not told yet why: nothing decided
    redelivered = [
        _event(trip, k.SAGA_EVENT_KIND_FLIGHT_RESERVED, "flight"),
        _event(trip, k.SAGA_EVENT_KIND_HOTEL_RESERVED, "hotel"),
    ]
    assert [change_for(cancelled_first, e) for e in redelivered] == [None, None]  # stale
    ended = _apply(
        cancelled_first,
        *redelivered,
        _event(trip, k.SAGA_EVENT_KIND_CAR_REFUSED, "car", reason="sold out"),
    )
    assert (ended.status, ended.failure_reason) == (TripStatus.ABORTED, "car: sold out")
    assert [leg.status for leg in ended.legs] == [
        LegStatus.CANCELLED,
        LegStatus.CANCELLED,
        LegStatus.REFUSED,
    ]
    # The refusal first, before the reservations it undoes: not over until the flight
    # has given its seat back.
    refused_first = _apply(trip, _event(trip, k.SAGA_EVENT_KIND_CAR_REFUSED, "car"))
    assert (refused_first.status, refused_first.decision) == (TripStatus.PENDING, Decision.ABORT)
    hotel_back = _apply(refused_first, _event(trip, k.SAGA_EVENT_KIND_HOTEL_CANCELLED, "hotel"))
    assert hotel_back.status is TripStatus.PENDING
    done = _apply(hotel_back, _event(trip, k.SAGA_EVENT_KIND_FLIGHT_CANCELLED, "flight"))
    assert done.status is TripStatus.ABORTED
    store.close()


def test_a_trip_given_up_is_not_confirmed_by_a_late_car(tmp_path: Path) -> None:
    store, trip = _created(tmp_path)
    reserved = _apply(
        trip,
        _event(trip, K.SAGA_EVENT_KIND_FLIGHT_RESERVED, "flight"),
        _event(trip, K.SAGA_EVENT_KIND_HOTEL_RESERVED, "hotel"),
    )
    given_up = replace(reserved, decision=Decision.ABORT)  # what `give_up` writes
    # Every service undoes its leg at once: the flight may answer first, and the trip is
    # not over while the hotel still holds its room.
    flight_first = _apply(given_up, _event(trip, K.SAGA_EVENT_KIND_FLIGHT_CANCELLED, "flight"))
    assert flight_first.status is TripStatus.PENDING
    ended = _apply(
        flight_first,
        _event(trip, K.SAGA_EVENT_KIND_HOTEL_CANCELLED, "hotel"),
        _event(trip, K.SAGA_EVENT_KIND_CAR_RESERVED, "car"),
    )
    assert ended.status is TripStatus.ABORTED
    assert ended.leg(LegKind.CAR).status is LegStatus.CONFIRMED  # for now: its undo follows
    undone = _apply(ended, _event(trip, K.SAGA_EVENT_KIND_CAR_CANCELLED, "car"))
    assert (undone.status, undone.leg(LegKind.CAR).status) == (
        TripStatus.ABORTED,
        LegStatus.CANCELLED,
    )
    store.close()


def test_a_quiet_trip_names_the_last_event_and_whose_reaction_it_awaits() -> None:
    requested = [TripEvent("created"), TripEvent("trip_requested")]
    assert stuck_detail(requested, 31) == (
        "no event for 31 s; last: trip_requested; waiting for flight to reserve"
    )
    hotel = [*requested, TripEvent("hotel_reserved", "hotel", "to flight_reserved")]
    assert stuck_detail(hotel, 45.2).endswith("last: hotel_reserved; waiting for car to reserve")
    refused = [*hotel, TripEvent("car_refused", "car", "to hotel_reserved: sold out")]
    assert stuck_detail(refused, 40).endswith("waiting for hotel to cancel")
    noted = [*refused, TripEvent("retry", "car", "cancel unavailable")]  # not an event's line
    assert stuck_detail(noted, 40).endswith("waiting for hotel to cancel")
    abandoned = [*noted, TripEvent("trip_abandoned", "", "no car for a day", "ops@example")]
    assert stuck_detail(abandoned, 40).endswith(
        "waiting for flight to cancel or hotel to cancel or car to cancel"
    )


def test_the_follower_marks_a_quiet_trip_stuck_and_a_later_event_moves_it_on(
    tmp_path: Path,
) -> None:
    async def go() -> tuple[Trip, Trip]:
        store = SqliteTripStore(tmp_path / "trips.db")
        trip, _ = await store.create(_request())
        follower = EventFollower(store, "nats://127.0.0.1:1", stuck_after=0.3)
        stuck = await follower.until_settled(trip.trip_id)
        await follower.apply(_event(trip, K.SAGA_EVENT_KIND_FLIGHT_REFUSED, "flight", "full"))
        moved = await store.get(trip.trip_id)
        store.close()
        assert moved is not None
        return stuck, moved

    stuck, moved = asyncio.run(go())
    assert (stuck.status, stuck.attention) == (
        TripStatus.NEEDS_ATTENTION,
        Attention.CHOREOGRAPHY_STUCK,
    )
    assert "waiting for flight to reserve" in stuck.attention_detail
    assert (moved.status, moved.attention) == (TripStatus.ABORTED, None)


def test_a_version_3_trip_store_is_upgraded_and_keeps_its_trips(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = TRIPS_TABLE.replace(", 'choreography'", "").replace(", 'choreography_stuck'", "")
    assert old != TRIPS_TABLE
    conn = sqlite3.connect(path)
    conn.execute(old)
    conn.execute(
        "CREATE TABLE legs (trip_id TEXT NOT NULL REFERENCES trips(trip_id), kind TEXT NOT NULL,"
        " reservation_id TEXT NOT NULL UNIQUE, status TEXT NOT NULL, price_cents INTEGER NOT NULL"
        " DEFAULT 0, reason TEXT NOT NULL DEFAULT '', PRIMARY KEY (trip_id, kind)) WITHOUT ROWID"
    )
    body = _request("old").to_json().replace('"choreography"', '"saga"')
    conn.execute(
        "INSERT INTO trips (trip_id, protocol, status, request, created_at, updated_at)"
        " VALUES ('trip-old', 'saga', 'confirmed', ?, 1, 2)",
        (body,),
    )
    conn.executemany(
        "INSERT INTO legs (trip_id, kind, reservation_id, status) VALUES (?, ?, ?, 'confirmed')",
        [("trip-old", k, f"trip-old-{k}") for k in ("flight", "hotel", "car")],
    )
    with pytest.raises(sqlite3.IntegrityError):  # the old CHECK: no choreography
        conn.execute(
            "INSERT INTO trips (trip_id, protocol, status, request, created_at, updated_at)"
            " VALUES ('x', 'choreography', 'pending', '{}', 1, 1)"
        )
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    store = SqliteTripStore(path)
    kept = asyncio.run(store.get("trip-old"))
    assert kept is not None and kept.status is TripStatus.CONFIRMED
    assert [leg.status for leg in kept.legs] == [LegStatus.CONFIRMED] * 3
    trip, _ = asyncio.run(store.create(_request("new")))
    assert trip.protocol is Protocol.CHOREOGRAPHY
    (version,) = store.db.read_sync(lambda c: c.execute("PRAGMA user_version").fetchone())
    assert version == 4
    store.close()
