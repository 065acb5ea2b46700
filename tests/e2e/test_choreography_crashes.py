"""The choreographed saga through real crashes: SIGKILL between a step's commit and the
acknowledgement of the event it reacted to, and between publishing an event and marking
it published, in every process of a mesh as `make up` runs it (supervisord restarts
what dies).

Each process is killed once at each failpoint (a marker keeps a restarted process from
dying again). Afterwards every trip must have ended, all-or-nothing, with exactly one
reservation per leg, and the units taken must be exactly the confirmed trips' units.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.books import Books, trip_request
from tests.e2e.conftest import doomed_catalog_mesh
from tripmesh import PARTICIPANTS
from tripmesh.mesh.mesh import Mesh
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import participant_pb2 as ppb

pytestmark = pytest.mark.e2e

FAILPOINTS = "choreography.before_ack=crash,outbox.after_publish=crash@3"
TRIPS = [("CX", 4), ("C-NONE", 2)]  # (car, how many trips): booked, and doomed
TERMINAL = {cpb.TRIP_STATUS_CONFIRMED, cpb.TRIP_STATUS_ABORTED}


@pytest.fixture(scope="module")
def crashing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Books, Path]]:
    folder = tmp_path_factory.mktemp("choreography-crashes")
    markers = folder / "failpoints"
    with doomed_catalog_mesh(
        folder, TRIPMESH_FAILPOINTS=FAILPOINTS, TRIPMESH_FAILPOINT_DIR=str(markers)
    ) as (mesh, books):
        yield mesh, books, markers


def _book(books: Books, request: cpb.BookTripRequest, timeout: float = 60.0) -> cpb.Trip:
    """BookTrip as a client does it: when the coordinator dies under the call, again with the
    same idempotency key."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return books.coordinator.BookTrip(request, timeout=20).trip
        except grpc.RpcError as exc:
            retriable = exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )  # type: ignore[attr-defined]
            if not retriable or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _settled(books: Books, trip_ids: list[str], timeout: float = 90.0) -> list[cpb.Trip]:
    deadline = time.monotonic() + timeout
    while True:
        trips = [
            books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=t), timeout=5) for t in trip_ids
        ]
        if all(t.status in TERMINAL for t in trips) or time.monotonic() > deadline:
            return trips
        time.sleep(0.5)


def test_crashes_between_commit_ack_and_publish_lose_and_double_nothing(
    crashing: tuple[Mesh, Books, Path],
) -> None:
    mesh, books, markers = crashing
    trip_ids = []
    for car, count in TRIPS:
        for i in range(count):
            request = trip_request(f"crash-{car}-{i}", cpb.PROTOCOL_CHOREOGRAPHY,
                                   flight="FX", hotel="HX", car=car, offset=1 + i)  # fmt: skip
            trip_ids.append(_book(books, request).trip_id)
    trips = _settled(books, trip_ids)
    assert [cpb.TripStatus.Name(t.status) for t in trips] == ["TRIP_STATUS_CONFIRMED"] * 4 + [
        "TRIP_STATUS_ABORTED"
    ] * 2
    # Both failpoints fired, and every service died at the one before the acknowledgement.
    assert {p.name for p in markers.iterdir()} == {
        "choreography.before_ack.fired",
        "outbox.after_publish.fired",
    }
    for kind in PARTICIPANTS:
        log = mesh.log_path(kind).read_text()
        assert "failpoint choreography.before_ack: crash" in log, kind
    held_units = {"flight": 0, "hotel": 0, "car": 0}
    for trip in trips:
        for kind, stub in books.participants.items():
            rows = stub.ListReservations(
                ppb.ListReservationsRequest(trip_id=trip.trip_id), timeout=5
            ).reservations
            assert len(rows) == 1, (trip.trip_id, kind, rows)  # never doubled, never lost
            (row,) = rows
            if trip.status == cpb.TRIP_STATUS_CONFIRMED:
                assert row.status == ppb.RESERVATION_STATUS_CONFIRMED
                held_units[kind] += row.hold.quantity * row.hold.days
            else:
                assert row.status in (
                    ppb.RESERVATION_STATUS_CANCELLED,
                    ppb.RESERVATION_STATUS_REFUSED,
                ), (kind, row)
    # The books agree: what is taken is exactly what the confirmed trips took.
    for kind, resource in (("flight", "FX"), ("hotel", "HX"), ("car", "CX")):
        totals = books.participants[kind].SummarizeInventory(
            ppb.SummarizeInventoryRequest(), timeout=5
        )
        row = next(r for r in totals.resources if r.resource_id == resource)
        assert (row.confirmed, row.held) == (held_units[kind], 0), (kind, row)
