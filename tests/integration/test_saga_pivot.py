"""A saga with a pivot step, on real processes: hotel is the pivot, car is retriable.

Before the pivot succeeded a failure compensates in reverse order; after it the
saga only moves forward: the car, down for a while, is retried until it comes
back, and nothing is ever cancelled.
"""

from __future__ import annotations

import threading
import time

from tests.books import trip_request
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import participant_pb2 as ppb

PIVOT = ["--saga-pivot", "hotel"]


def test_past_the_pivot_a_car_that_was_down_is_retried_forward(make_cluster) -> None:
    cluster, books = make_cluster(coordinator_args=PIVOT)
    car = cluster.services["car"]
    car.stop()
    back = threading.Timer(3.0, car.start)
    back.start()
    started = time.monotonic()
    trip = books.coordinator.BookTrip(
        trip_request("pivot-forward", cpb.PROTOCOL_SAGA, flight="FX", hotel="H", car="C"),
        timeout=25,
    ).trip
    back.join()
    trip = books.wait_trip(trip.trip_id)
    assert trip.status == cpb.TRIP_STATUS_CONFIRMED
    assert time.monotonic() - started >= 3.0  # it did wait for the car
    kinds = [e.kind for e in trip.events]
    assert "pivot" in kinds and "compensation" not in kinds
    assert kinds.index("pivot") < kinds.index("retry")
    for kind in ("flight", "hotel", "car"):
        assert [r.status for r in books.reservations(kind, trip.trip_id)] == [
            ppb.RESERVATION_STATUS_CONFIRMED
        ]
    books.assert_all_or_nothing(trip)


def test_before_the_pivot_a_failure_still_compensates(make_cluster) -> None:
    _, books = make_cluster(coordinator_args=["--saga-pivot", "car"])
    trip = books.coordinator.BookTrip(
        trip_request("pivot-back", cpb.PROTOCOL_SAGA, flight="FX", hotel="H", car="C-SOLD-OUT"),
        timeout=10,
    ).trip
    assert trip.status == cpb.TRIP_STATUS_ABORTED
    trip = books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=trip.trip_id), timeout=5)
    assert [e.leg for e in trip.events if e.kind == "compensation"] == ["hotel", "flight"]
    books.assert_all_or_nothing(trip)


def test_past_the_pivot_a_refusal_needs_attention_and_cancels_nothing(make_cluster) -> None:
    _, books = make_cluster(coordinator_args=PIVOT)
    trip = books.coordinator.BookTrip(
        trip_request("pivot-stuck", cpb.PROTOCOL_SAGA, flight="FX", hotel="H", car="C-SOLD-OUT"),
        timeout=10,
    ).trip
    assert trip.status == cpb.TRIP_STATUS_NEEDS_ATTENTION
    assert trip.attention == cpb.ATTENTION_FORWARD_STUCK
    assert "car" in trip.attention_detail
    assert books.totals("flight", "FX") == (0, 1) and books.totals("hotel", "H") == (0, 2)
