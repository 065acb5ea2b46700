"""Steps: several protocol steps in one call, against real participant processes.

Each step of a Steps call is answered as its own call would be (the same reply,
the same status, the field named from the Steps request), one step's error fails
only that step, and the books move exactly as the lone calls would move them.
The coordinator sends its steps this way when it is busy: the steps of trips
booked at once share calls (its histogram says how many), and the books agree.
"""

from __future__ import annotations

import concurrent.futures
import urllib.request

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from tests.books import day, trip_request
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import participant_pb2 as ppb


def _hold(days: int = 1, resource: str = "FX") -> ppb.Hold:
    return ppb.Hold(resource_id=resource, start_date=day(1), days=days, quantity=1)


def _reserve(reservation_id: str, hold: ppb.Hold | None = None) -> ppb.Step:
    return ppb.Step(
        reserve=ppb.ReserveRequest(
            reservation_id=reservation_id, trip_id=f"trip-{reservation_id}", hold=hold or _hold()
        )
    )


def test_each_step_is_answered_as_its_own_call_would_be(make_cluster) -> None:
    _, books = make_cluster()
    flight = books.participants["flight"]
    alone = flight.Reserve(_reserve("alone").reserve, timeout=5)
    steps = [
        _reserve("together"),
        _reserve("bad", _hold(days=0)),
        ppb.Step(commit=ppb.CommitRequest(reservation_id="never-prepared", trip_id="trip-x")),
        _reserve("together"),  # a duplicate in the same call: the same one reservation
        ppb.Step(),  # names no step
        _reserve("ghost", _hold(resource="NO-SUCH-FLIGHT")),
        ppb.Step(cancel=ppb.CancelRequest(reservation_id="alone", trip_id="trip-alone")),
    ]
    outcomes = flight.Steps(ppb.StepsRequest(steps=steps), timeout=10).outcomes
    assert len(outcomes) == len(steps)
    kinds = [o.WhichOneof("outcome") for o in outcomes]
    assert kinds == ["reserve", "error", "error", "reserve", "error", "error", "cancel"]

    together = outcomes[0].reserve
    assert together.reserved and alone.reserved
    assert together.reservation.price_cents == alone.reservation.price_cents
    assert outcomes[3].reserve.reservation == together.reservation  # idempotent

    bad = outcomes[1].error
    assert bad.code == code_pb2.INVALID_ARGUMENT
    assert [v.field for v in bad.field_violations] == ["steps[1].reserve.hold.days"]
    assert "steps[1].reserve.hold.days" in bad.message
    # The lone call's answer for the same step: the same status and field, unprefixed.
    with pytest.raises(grpc.RpcError) as lone:
        flight.Reserve(_reserve("bad", _hold(days=0)).reserve, timeout=5)
    assert lone.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(lone.value)
    assert status is not None
    request = error_details_pb2.BadRequest()
    status.details[0].Unpack(request)
    assert [v.field for v in request.field_violations] == ["hold.days"]

    # A commit of nothing prepared, a flight not on sale: each the code its lone call gets.
    for index, lone_call in ((2, flight.Commit), (5, flight.Reserve)):
        which = steps[index].WhichOneof("request")
        with pytest.raises(grpc.RpcError) as lone_error:
            lone_call(getattr(steps[index], which), timeout=5)
        assert outcomes[index].error.code == lone_error.value.code().value[0], index

    assert outcomes[4].error.code == code_pb2.INVALID_ARGUMENT
    assert [v.field for v in outcomes[4].error.field_violations] == ["steps[4].request"]

    assert outcomes[6].cancel.reservation.status == ppb.RESERVATION_STATUS_CANCELLED

    # The books: one seat for "together" (not two), none for "alone" (cancelled).
    assert books.totals("flight", "FX") == (0, 1)
    assert {r.reservation_id: r.status for r in books.reservations("flight")} == {
        "alone": ppb.RESERVATION_STATUS_CANCELLED,
        "together": ppb.RESERVATION_STATUS_CONFIRMED,
    }


def test_a_call_with_too_many_steps_is_refused_whole_and_writes_nothing(make_cluster) -> None:
    _, books = make_cluster()
    flight = books.participants["flight"]
    steps = [_reserve(f"many-{n}") for n in range(1001)]
    with pytest.raises(grpc.RpcError) as refused:
        flight.Steps(ppb.StepsRequest(steps=steps), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "steps" in str(refused.value.details())
    assert books.reservations("flight") == []
    assert books.totals("flight", "FX") == (0, 0)


def _steps_per_call(admin_address: str) -> tuple[float, float]:
    """(Steps calls, steps they carried) to the flight service, from the coordinator's metrics."""
    with urllib.request.urlopen(f"http://{admin_address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    calls = steps = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("participant") != "flight":
                continue
            if sample.name == "tripmesh_participant_steps_per_call_count":
                calls = sample.value
            elif sample.name == "tripmesh_participant_steps_per_call_sum":
                steps = sample.value
    return calls, steps


def test_trips_booked_at_once_share_calls_and_the_books_agree(make_cluster) -> None:
    cluster, books = make_cluster()
    trips = 60

    def book(n: int) -> cpb.Trip:
        request = trip_request(f"shared-{n}", cpb.PROTOCOL_SAGA, flight="FX", hotel="H", car="C")
        return books.coordinator.BookTrip(request, timeout=30).trip

    with concurrent.futures.ThreadPoolExecutor(max_workers=trips) as pool:
        booked = list(pool.map(book, range(trips)))
    assert [t.status for t in booked] == [cpb.TRIP_STATUS_CONFIRMED] * trips
    calls, steps = _steps_per_call(cluster.admin_address)
    assert steps == trips  # one Reserve per trip, each carried once
    assert calls < steps  # some travelled together
    for trip in booked:
        books.assert_all_or_nothing(trip)
    assert books.totals("flight", "FX") == (0, trips)
