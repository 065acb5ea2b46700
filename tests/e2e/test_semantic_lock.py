"""The saga's semantic lock, measured from a reader's side (done-when 5 of the 3PC/isolation issue).

The mesh as `make up` runs it, with a catalog whose car is sold out and 300 ms
of latency on the coordinator-to-car edge: each saga reserves its flight and
hotel, waits for the car, is refused, and compensates. A reader polls the
flight service's reservations meanwhile, as any auditor could. Without the
lock it sees legs CONFIRMED that are then cancelled (dirty reads); with the
lock it sees them PENDING, and never confirmed. The same seeded workload runs
both ways.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from tests.books import Books, trip_request
from tests.e2e.conftest import doomed_catalog_mesh
from tripmesh.mesh.layout import TOXIPROXY
from tripmesh.mesh.mesh import Mesh
from tripmesh.mesh.toxiproxy import Toxiproxy
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import participant_pb2 as ppb

pytestmark = pytest.mark.e2e

TRIPS = 8


@pytest.fixture(scope="module")
def doomed_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Books]]:
    with doomed_catalog_mesh(tmp_path_factory.mktemp("semantic-lock")) as (mesh, books):
        toxiproxy = Toxiproxy(mesh.layout.host, mesh.layout.ports[TOXIPROXY])
        toxiproxy.add_toxic("coordinator-to-car", "latency", attributes={"latency": 300})
        yield mesh, books


def _flight_totals(books: Books) -> ppb.ResourceTotals:
    reply = books.participants["flight"].SummarizeInventory(
        ppb.SummarizeInventoryRequest(), timeout=5
    )
    return next(r for r in reply.resources if r.resource_id == "FX")


def _dirty_reads(books: Books, lock: bool, tag: str) -> tuple[int, int, int, int]:
    """Book TRIPS doomed sagas while a reader polls; (seen confirmed then cancelled,
    seen pending, trips aborted, the most pending units the inventory summary showed)."""
    seen: dict[str, set[int]] = {}
    most_pending = 0
    wrong: list[ppb.ResourceTotals] = []
    done = threading.Event()

    def read() -> None:
        nonlocal most_pending
        while not done.is_set():
            for r in books.reservations("flight"):
                seen.setdefault(r.reservation_id, set()).add(r.status)
            totals = _flight_totals(books)
            if totals.pending > totals.held:  # pending units are part of held, never more
                wrong.append(totals)
            most_pending = max(most_pending, totals.pending)
            time.sleep(0.01)

    reader = threading.Thread(target=read)
    reader.start()
    aborted = 0
    try:
        for i in range(TRIPS):
            request = trip_request(
                f"{tag}-{i}", cpb.PROTOCOL_SAGA, flight="FX", hotel="HX", car="C-NONE"
            )
            request.semantic_lock = lock
            trip = books.coordinator.BookTrip(request, timeout=15).trip
            aborted += trip.status == cpb.TRIP_STATUS_ABORTED
    finally:
        done.set()
        reader.join()
    assert not wrong, wrong
    final = {r.reservation_id: r.status for r in books.reservations("flight")}
    ours = {rid: statuses for rid, statuses in seen.items() if rid.startswith("trip-")}
    dirty = sum(
        1
        for rid, statuses in ours.items()
        if ppb.RESERVATION_STATUS_CONFIRMED in statuses
        and final.get(rid) == ppb.RESERVATION_STATUS_CANCELLED
    )
    pending = sum(1 for statuses in ours.values() if ppb.RESERVATION_STATUS_PENDING in statuses)
    return dirty, pending, aborted, most_pending


def test_a_reader_never_sees_a_compensated_leg_confirmed_under_the_lock(
    doomed_mesh: tuple[Mesh, Books],
) -> None:
    _, books = doomed_mesh
    before = {r.reservation_id for r in books.reservations("flight")}
    dirty_off, pending_off, aborted_off, summary_off = _dirty_reads(books, False, "off")
    after_off = {r.reservation_id for r in books.reservations("flight")}
    dirty_on, pending_on, aborted_on, summary_on = _dirty_reads(books, True, "on")
    print(
        f"\ndoomed sagas, {TRIPS} each: without the lock the reader saw {dirty_off} legs"
        f" confirmed that were then cancelled; with it {dirty_on} (and {pending_on} pending)"
    )
    assert aborted_off == aborted_on == TRIPS
    assert len(after_off - before) == TRIPS
    assert dirty_off >= TRIPS // 2, "without the lock the reader should see dirty reads"
    assert pending_off == 0
    assert dirty_on == 0
    assert pending_on >= TRIPS // 2, "the reader was not looking while the locks were held"
    # The inventory summary (the operator page's figures) shows the pending units apart.
    assert summary_off == 0
    assert summary_on >= 1
    totals = books.totals("flight", "FX")
    assert totals == (0, 0)  # everything compensated, nothing held
    assert _flight_totals(books).pending == 0


def test_the_lock_costs_a_confirm_per_leg(doomed_mesh: tuple[Mesh, Books]) -> None:
    _, books = doomed_mesh
    latencies: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * TRIPS):
        lock = bool(i % 2)
        request = trip_request(f"ok-{i}", cpb.PROTOCOL_SAGA, flight="FX", hotel="HX", car="CX")
        request.semantic_lock = lock
        started = time.perf_counter()
        trip = books.coordinator.BookTrip(request, timeout=15).trip
        latencies[lock].append((time.perf_counter() - started) * 1000)
        assert trip.status == cpb.TRIP_STATUS_CONFIRMED, trip
        books.assert_all_or_nothing(trip)
        full = books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=trip.trip_id), timeout=5)
        confirms = [e for e in full.events if e.kind == "confirmed"]
        assert len(confirms) == (3 if lock else 0)
    off, on = statistics.median(latencies[False]), statistics.median(latencies[True])
    print(
        f"\nsaga median latency, 300 ms on the car edge: {off:.0f} ms without the lock,"
        f" {on:.0f} ms with it (3 more RPCs and 1 more write per trip)"
    )
    assert on > off  # the Confirm to the car crosses its 300 ms edge: the lock is not free
