"""Done-when 1, 2, 6 and 8 of the booking mesh: real servers, real SQLite files."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.books import trip_request
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import coordinator_pb2_grpc
from tripmesh.v1 import participant_pb2 as ppb

PROTOCOLS = [
    pytest.param(cpb.PROTOCOL_TWO_PHASE_COMMIT, id="2pc"),
    pytest.param(cpb.PROTOCOL_SAGA, id="saga"),
    pytest.param(cpb.PROTOCOL_THREE_PHASE_COMMIT, id="3pc"),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_books_a_trip_and_the_books_agree(make_cluster, protocol: int) -> None:
    _, books = make_cluster()
    reply = books.coordinator.BookTrip(
        trip_request("k1", protocol, flight="FX", hotel="H", car="C", nights=3), timeout=10
    )
    trip = reply.trip
    assert trip.status == cpb.TRIP_STATUS_CONFIRMED, trip
    assert not reply.replayed
    assert [leg.status for leg in trip.legs] == [cpb.LEG_STATUS_CONFIRMED] * 3
    # 1 seat + 3 room-nights + 3 car-days at $100 each.
    assert trip.total_price_cents == 7 * 10_000
    for leg, kind in zip(trip.legs, ("flight", "hotel", "car"), strict=True):
        (reservation,) = books.reservations(kind, trip.trip_id)
        assert reservation.reservation_id == leg.reservation_id
        assert reservation.status == ppb.RESERVATION_STATUS_CONFIRMED
        assert reservation.price_cents == leg.price_cents
    assert books.totals("flight", "FX") == (0, 1)
    assert books.totals("hotel", "H") == (0, 3)
    assert books.totals("car", "C") == (0, 3)


@pytest.mark.parametrize(
    "protocol",
    [
        pytest.param(cpb.PROTOCOL_TWO_PHASE_COMMIT, id="2pc"),
        pytest.param(cpb.PROTOCOL_THREE_PHASE_COMMIT, id="3pc"),
    ],
)
def test_car_sold_out_2pc_and_3pc_abort_with_nothing_held(make_cluster, protocol: int) -> None:
    _, books = make_cluster()
    trip = books.coordinator.BookTrip(
        trip_request("k", protocol, flight="FX", hotel="H", car="C-SOLD-OUT"),
        timeout=10,
    ).trip
    assert trip.status == cpb.TRIP_STATUS_ABORTED
    assert trip.decision == cpb.DECISION_ABORT
    assert "car" in trip.failure_reason and "sold out" in trip.failure_reason
    statuses = books.trip_statuses(trip.trip_id)
    assert statuses == {
        "flight": ppb.RESERVATION_STATUS_RELEASED,
        "hotel": ppb.RESERVATION_STATUS_RELEASED,
        "car": ppb.RESERVATION_STATUS_REFUSED,
    }
    assert books.totals("flight", "FX") == (0, 0)
    assert books.totals("hotel", "H") == (0, 0)
    assert books.totals("car", "C-SOLD-OUT") == (0, 0)
    # An Abort to the car (as a restarted coordinator sends to every leg) leaves its
    # refusal a refusal: it took nothing, so nothing reads it as a hold given back.
    (car,) = books.reservations("car", trip.trip_id)
    again = books.participants["car"].Abort(
        ppb.AbortRequest(
            reservation_id=car.reservation_id,
            trip_id=trip.trip_id,
            protocol=ppb.PARTICIPANT_PROTOCOL_THREE_PHASE_COMMIT
            if protocol == cpb.PROTOCOL_THREE_PHASE_COMMIT
            else ppb.PARTICIPANT_PROTOCOL_TWO_PHASE_COMMIT,
        ),
        timeout=5,
    )
    assert again.reservation.status == ppb.RESERVATION_STATUS_REFUSED
    assert books.trip_statuses(trip.trip_id)["car"] == ppb.RESERVATION_STATUS_REFUSED


def test_car_sold_out_saga_compensates_hotel_then_flight(make_cluster) -> None:
    cluster, books = make_cluster()
    trip = books.coordinator.BookTrip(
        trip_request("k", cpb.PROTOCOL_SAGA, flight="FX", hotel="H", car="C-SOLD-OUT"), timeout=10
    ).trip
    assert trip.status == cpb.TRIP_STATUS_ABORTED
    assert [leg.status for leg in trip.legs] == [
        cpb.LEG_STATUS_CANCELLED,
        cpb.LEG_STATUS_CANCELLED,
        cpb.LEG_STATUS_REFUSED,
    ]
    flight = books.reservations("flight", trip.trip_id)[0]
    hotel = books.reservations("hotel", trip.trip_id)[0]
    assert flight.status == hotel.status == ppb.RESERVATION_STATUS_CANCELLED
    # The order, from each participant's own record of when it was cancelled...
    assert hotel.updated_at.ToNanoseconds() < flight.updated_at.ToNanoseconds()
    # ...and from the coordinator's timeline in its log.
    import sqlite3

    log = sqlite3.connect(f"file:{cluster.data_dir / 'coordinator.db'}?mode=ro", uri=True)
    compensations = [
        leg
        for (leg,) in log.execute(
            "SELECT leg FROM events WHERE trip_id = ? AND kind = 'compensation' ORDER BY seq",
            (trip.trip_id,),
        )
    ]
    log.close()
    assert compensations == ["hotel", "flight"]
    assert books.totals("flight", "FX") == (0, 0)
    assert books.totals("hotel", "H") == (0, 0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_idempotency_key_returns_the_same_trip(make_cluster, protocol: int) -> None:
    _, books = make_cluster()
    request = trip_request("same-key", protocol, flight="FX", hotel="H", car="C")
    first = books.coordinator.BookTrip(request, timeout=10)
    again = books.coordinator.BookTrip(request, timeout=10)
    assert again.replayed and not first.replayed
    assert again.trip.trip_id == first.trip.trip_id
    assert again.trip.status == cpb.TRIP_STATUS_CONFIRMED

    other = trip_request("same-key", protocol, flight="FX", hotel="H", car="C", nights=4)
    with pytest.raises(grpc.RpcError) as caught:
        books.coordinator.BookTrip(other, timeout=10)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "same-key" in caught.value.details()
    assert first.trip.trip_id in caught.value.details()
    # Only the first trip took anything.
    assert books.totals("flight", "FX") == (0, 1)
    assert books.totals("hotel", "H") == (0, 2)


async def _book_all(
    address: str, requests: list[cpb.BookTripRequest]
) -> list[cpb.BookTripResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        return await asyncio.gather(*(stub.BookTrip(r, timeout=60) for r in requests))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_twenty_concurrent_duplicates_create_one_trip(make_cluster, protocol: int) -> None:
    cluster, books = make_cluster()
    request = trip_request("dup", protocol, flight="FX", hotel="H", car="C")
    replies = asyncio.run(_book_all(cluster.coordinator.address, [request] * 20))
    assert len({r.trip.trip_id for r in replies}) == 1
    assert sum(not r.replayed for r in replies) == 1
    listed = books.coordinator.ListTrips(cpb.ListTripsRequest(), timeout=5).trips
    assert len(listed) == 1
    assert books.totals("flight", "FX") == (0, 1)


@pytest.mark.parametrize(
    ("protocol", "flight"),
    [
        pytest.param(cpb.PROTOCOL_TWO_PHASE_COMMIT, "F50", id="2pc"),
        pytest.param(cpb.PROTOCOL_SAGA, "F50-SAGA", id="saga"),
    ],
)
def test_two_hundred_bookings_for_fifty_seats(make_cluster, protocol: int, flight: str) -> None:
    cluster, books = make_cluster()
    requests = [
        trip_request(f"rush-{i}", protocol, flight=flight, hotel="H", car="C") for i in range(200)
    ]
    replies = asyncio.run(_book_all(cluster.coordinator.address, requests))
    statuses = [r.trip.status for r in replies]
    assert statuses.count(cpb.TRIP_STATUS_CONFIRMED) == 50
    assert statuses.count(cpb.TRIP_STATUS_ABORTED) == 150
    assert books.totals("flight", flight) == (0, 50)
    # Every aborted trip gave back its hotel room and car: 50 of each remain taken.
    assert books.totals("hotel", "H") == (0, 100)
    assert books.totals("car", "C") == (0, 100)
    for reply in replies:
        books.assert_all_or_nothing(reply.trip)
