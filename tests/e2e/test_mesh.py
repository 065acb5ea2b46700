"""The mesh as `make up` runs it: bookings through Toxiproxy, and a partition of the hotel edge.

Every call here enters through the client-to-coordinator proxy, and the
coordinator reaches the services only through their proxies. The books are
read from each service directly, as an auditor would. The catalog is the
built-in one `make up` seeds (the story's trip: JL5, Tokyo Grand, a Camry),
and each test books its own dates so that their inventories do not mix.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.books import Books, day, eventually, trip_request
from tests.e2e.conftest import RunningMesh, isolated_env, run_launcher, start, stop_and_check
from tripmesh.mesh.layout import TOXIPROXY, free_port
from tripmesh.mesh.toxiproxy import Toxiproxy
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import participant_pb2 as ppb

pytestmark = pytest.mark.e2e

TWO_PC, SAGA = cpb.PROTOCOL_TWO_PHASE_COMMIT, cpb.PROTOCOL_SAGA
STORY = {"flight": "JL5", "hotel": "TOKYO-GRAND", "car": "CAMRY-NRT"}
NIGHTS = 2
HOTEL_EDGE = "coordinator-to-hotel"
# (date, available, held, confirmed) per kind, on a trip's dates.
Snapshot = dict[str, list[tuple[str, int, int, int]]]


def book_via(books: Books, key: str, protocol: int, offset: int, *, timeout: float) -> cpb.Trip:
    request = trip_request(key, protocol, **STORY, offset=offset, nights=NIGHTS)
    return books.coordinator.BookTrip(request, timeout=timeout).trip


def book(mesh: RunningMesh, key: str, protocol: int, offset: int, *, timeout: float) -> cpb.Trip:
    return book_via(mesh.books, key, protocol, offset, timeout=timeout)


def snapshot(books: Books, offset: int) -> Snapshot:
    """(date, available, held, confirmed) of the story's resources on a trip's dates."""
    dates = {day(offset + i) for i in range(NIGHTS)}
    return {
        kind: [
            (d.date, d.available, d.held, d.confirmed)
            for d in books.inventory(kind, resource)
            if d.date in dates
        ]
        for kind, resource in STORY.items()
    }


def held(books: Books, offset: int) -> dict[str, int]:
    return {k: sum(d[2] for d in days) for k, days in snapshot(books, offset).items()}


def assert_one_trip_taken(before: Snapshot, after: Snapshot) -> None:
    """One seat on the first date; one room and one car on each date."""
    for kind in STORY:
        taken = [b[1] - a[1] for b, a in zip(before[kind], after[kind], strict=True)]
        expected = [1] + [0] * (NIGHTS - 1) if kind == "flight" else [1] * NIGHTS
        assert taken == expected, (kind, taken)
        assert all(d[2] == 0 for d in after[kind]), (kind, after[kind])  # nothing left held


def legs(trip: cpb.Trip) -> dict[str, int]:
    return {
        cpb.LegKind.Name(leg.kind).removeprefix("LEG_KIND_").lower(): leg.status
        for leg in trip.legs
    }


def test_reflection_lists_services_through_the_client_proxy(running_mesh: RunningMesh) -> None:
    def services() -> set[str]:
        with grpc.insecure_channel(running_mesh.client_address) as channel:
            return set(ProtoReflectionDescriptorDatabase(channel).get_services())

    found = services()
    assert {
        "tripmesh.v1.Coordinator",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= found, found
    with grpc.insecure_channel(running_mesh.client_address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        methods = pool.FindServiceByName("tripmesh.v1.Coordinator").methods_by_name
        assert {"BookTrip", "GetTrip", "ListTrips"} <= set(methods)
    # The answer really comes through Toxiproxy: with the edge down, nothing answers.
    with running_mesh.toxiproxy.disabled("client-to-coordinator"):
        with pytest.raises(grpc.RpcError) as cut:
            services()
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    assert services() == found


def test_a_proxy_created_at_run_time_carries_traffic_until_deleted(
    running_mesh: RunningMesh,
) -> None:
    """The wrapper's create/delete (the bench's echo proxy uses them) on the real server."""
    toxiproxy, listen = running_mesh.toxiproxy, f"127.0.0.1:{free_port()}"
    upstream = toxiproxy.proxy("client-to-coordinator").upstream
    created = toxiproxy.create_proxy("test-extra", listen, upstream)
    assert (created.listen, created.upstream, created.enabled) == (listen, upstream, True)

    def check() -> int:
        with grpc.insecure_channel(listen) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status

    try:
        assert check() == health_pb2.HealthCheckResponse.SERVING
    finally:
        toxiproxy.delete_proxy("test-extra")
    assert "test-extra" not in toxiproxy.proxies()
    with pytest.raises(grpc.RpcError) as gone:
        check()
    assert gone.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "protocol", [pytest.param(TWO_PC, id="2pc"), pytest.param(SAGA, id="saga")]
)
def test_books_a_trip_through_toxiproxy(running_mesh: RunningMesh, protocol: int) -> None:
    offset = 5 if protocol == TWO_PC else 6
    before = snapshot(running_mesh.books, offset)
    trip = book(running_mesh, f"e2e-ok-{protocol}", protocol, offset, timeout=15)
    assert trip.status == cpb.TRIP_STATUS_CONFIRMED, trip
    assert set(legs(trip).values()) == {cpb.LEG_STATUS_CONFIRMED}
    running_mesh.books.assert_all_or_nothing(trip)
    assert_one_trip_taken(before, snapshot(running_mesh.books, offset))


def test_2pc_with_the_hotel_cut_off_aborts_and_holds_nothing(running_mesh: RunningMesh) -> None:
    mesh, books, offset = running_mesh, running_mesh.books, 10
    before = snapshot(books, offset)
    mesh.toxiproxy.disable(HOTEL_EDGE)
    try:
        trip = book(mesh, "e2e-2pc-cut", TWO_PC, offset, timeout=2)
        # No vote from the hotel is a no: ABORT is logged, flight and car let go at
        # once, and the trip stays PENDING only until the hotel hears the abort.
        trip = books.wait_trip(
            trip.trip_id,
            lambda t: legs(t)["flight"] == legs(t)["car"] == cpb.LEG_STATUS_RELEASED,
            timeout=20,
        )
        assert trip.decision == cpb.DECISION_ABORT
        assert trip.status == cpb.TRIP_STATUS_PENDING
        assert "hotel" in trip.failure_reason
        assert legs(trip)["hotel"] != cpb.LEG_STATUS_RELEASED
        assert held(books, offset) == {"flight": 0, "hotel": 0, "car": 0}
        assert snapshot(books, offset) == before
        # The prepare never reached the hotel: it has nothing for this trip.
        assert books.reservations("hotel", trip.trip_id) == []
    finally:
        mesh.toxiproxy.enable(HOTEL_EDGE)
    trip = books.wait_trip(trip.trip_id, timeout=30)
    assert trip.status == cpb.TRIP_STATUS_ABORTED, trip
    assert set(legs(trip).values()) == {cpb.LEG_STATUS_RELEASED}
    # The late abort left a tombstone, so a Prepare still in the network would vote no.
    assert books.trip_statuses(trip.trip_id) == {
        "flight": ppb.RESERVATION_STATUS_RELEASED,
        "hotel": ppb.RESERVATION_STATUS_RELEASED,
        "car": ppb.RESERVATION_STATUS_RELEASED,
    }
    books.assert_all_or_nothing(trip)
    assert snapshot(books, offset) == before


def test_saga_with_the_hotel_cut_off_compensates(running_mesh: RunningMesh) -> None:
    mesh, books, offset = running_mesh, running_mesh.books, 15
    before = snapshot(books, offset)
    mesh.toxiproxy.disable(HOTEL_EDGE)
    try:
        trip = book(mesh, "e2e-saga-cut", SAGA, offset, timeout=2)
        # The flight is reserved at once; the hotel step is retried for its policy
        # (5 s) and then given up: compensation starts, with the hotel first.
        trip = books.wait_trip(trip.trip_id, lambda t: t.decision == cpb.DECISION_ABORT, timeout=20)
        assert trip.status == cpb.TRIP_STATUS_PENDING
        assert "hotel" in trip.failure_reason
        assert legs(trip)["car"] == cpb.LEG_STATUS_NOT_STARTED
        # No isolation in a saga: while the hotel cannot be told, the seat stays sold.
        assert books.trip_statuses(trip.trip_id)["flight"] == ppb.RESERVATION_STATUS_CONFIRMED
    finally:
        mesh.toxiproxy.enable(HOTEL_EDGE)
    trip = books.wait_trip(trip.trip_id, timeout=30)
    assert trip.status == cpb.TRIP_STATUS_ABORTED, trip
    assert legs(trip) == {
        "flight": cpb.LEG_STATUS_CANCELLED,
        "hotel": cpb.LEG_STATUS_CANCELLED,
        "car": cpb.LEG_STATUS_NOT_STARTED,
    }
    assert books.trip_statuses(trip.trip_id) == {
        "flight": ppb.RESERVATION_STATUS_CANCELLED,
        "hotel": ppb.RESERVATION_STATUS_CANCELLED,  # a tombstone: a late Reserve is refused
        "car": 0,
    }
    books.assert_all_or_nothing(trip)
    assert snapshot(books, offset) == before


def test_saga_completes_when_the_hotel_comes_back_within_its_retry_window(
    running_mesh: RunningMesh,
) -> None:
    mesh, books, offset = running_mesh, running_mesh.books, 20
    before = snapshot(books, offset)
    mesh.toxiproxy.disable(HOTEL_EDGE)
    try:
        trip = book(mesh, "e2e-saga-heal", SAGA, offset, timeout=1)
        # Wait until the saga is retrying the hotel step, then heal well inside 5 s.
        trip = books.wait_trip(
            trip.trip_id, lambda t: legs(t)["hotel"] == cpb.LEG_STATUS_IN_FLIGHT, timeout=10
        )
        assert legs(trip)["flight"] == cpb.LEG_STATUS_CONFIRMED
        assert trip.decision == cpb.DECISION_PENDING
    finally:
        mesh.toxiproxy.enable(HOTEL_EDGE)
    trip = books.wait_trip(trip.trip_id, timeout=30)
    assert trip.status == cpb.TRIP_STATUS_CONFIRMED, trip
    books.assert_all_or_nothing(trip)
    assert_one_trip_taken(before, snapshot(books, offset))


def test_up_twice_is_harmless_and_down_lets_a_booking_in_flight_finish(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data_dir, env = tmp_path_factory.mktemp("mesh-twice"), isolated_env()
    mesh = start(data_dir, env)
    lay = mesh.layout
    books = Books.open(lay.client_address, {k: lay.address(k) for k in STORY})
    try:
        pids = mesh.pids()
        began = time.monotonic()
        again = run_launcher("up", data_dir, env)
        assert again.returncode == 0, again.stderr
        assert "already up" in again.stdout
        assert time.monotonic() - began < 10
        assert mesh.pids() == pids  # nothing was started twice
        # A second mesh on the same ports says so and starts nothing.
        clash = run_launcher("up", tmp_path_factory.mktemp("mesh-clash"), env)
        assert clash.returncode == 1, clash.stdout
        assert "ports already in use" in clash.stderr, clash.stderr
        assert mesh.pids() == pids

        # A slow hotel keeps a booking in flight while `down` sends SIGTERM: the
        # coordinator drains it (and the proxies and services outlive it) before exiting.
        Toxiproxy(lay.host, lay.ports[TOXIPROXY]).add_toxic(
            HOTEL_EDGE, "latency", attributes={"latency": 1000}
        )
        with ThreadPoolExecutor(1) as pool:
            booking = pool.submit(lambda: book_via(books, "e2e-drain", SAGA, 25, timeout=20))
            eventually(lambda: _assert_pending(books), timeout=10)
            stop_and_check(mesh, env)  # asserts that no process is left
            trip = booking.result()
        assert trip.status == cpb.TRIP_STATUS_CONFIRMED, trip

        # The data folder is reused by the next `up`, and the trip is still there.
        mesh = start(data_dir, env)
        again_trip = books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=trip.trip_id), timeout=10)
        assert again_trip.status == cpb.TRIP_STATUS_CONFIRMED
    finally:
        books.close()
        stop_and_check(mesh, env)
    stopped_again = run_launcher("down", data_dir, env)
    assert stopped_again.returncode == 0
    assert "not running" in stopped_again.stdout


def _assert_pending(books: Books) -> None:
    pending = books.coordinator.ListTrips(
        cpb.ListTripsRequest(status=cpb.TRIP_STATUS_PENDING), timeout=5
    )
    assert len(pending.trips) == 1


def test_each_server_writes_its_own_log_and_supervisord_only_its_console(
    running_mesh: RunningMesh,
) -> None:
    logs = running_mesh.data_dir / "logs"
    config = (running_mesh.data_dir / "supervisord.conf").read_text()
    for name in ("coordinator", *STORY):
        assert f"stdout_logfile = {logs / f'{name}.console.log'}" in config, name
        assert f'TRIPMESH_LOG_FILE="{logs / f"{name}.log"}"' in config, name
        lines = (logs / f"{name}.log").read_text().splitlines()
        assert lines and {json.loads(line)["process"] for line in lines} == {name}
        # Nothing went through supervisord's pipe: no log line, no traceback.
        assert (logs / f"{name}.console.log").read_text() == "", name
