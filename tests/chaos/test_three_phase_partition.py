"""3PC's known failure, reproduced on purpose: a partition during commit leaves a partial trip.

One 3PC trip through the mesh as `make up` runs it (Toxiproxy on every hop).
Every participant votes yes; then the coordinator is cut off from the car (its
proxy disabled) before PreCommit. Flight and hotel acknowledge PreCommit; the
car's PreCommit goes unanswered, so the coordinator, as the textbook protocol
says, decides COMMIT, and flight and hotel commit. The car, having heard no
PreCommit, aborts on its own time-out. When the partition heals, the car
refuses DoCommit. The trip is partial, and the checker must say so: the lab
does not hide a protocol's real failure.

A coordinator failpoint (`3pc.before_decision=sleep:2`) holds the trip for two
seconds after the votes, so that the cut lands at the same point every run; the
participants wait six seconds for PreCommit, so only the cut-off car times out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from chaos import checker
from chaos.audit import read_books
from tests.books import Books, day
from tests.e2e.conftest import isolated_env, start, stop_and_check
from tripmesh import PARTICIPANTS
from tripmesh.mesh.layout import TOXIPROXY
from tripmesh.mesh.toxiproxy import Toxiproxy
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import participant_pb2 as ppb

pytestmark = pytest.mark.e2e

CAR_EDGE = "coordinator-to-car"


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, (
            f"not within {timeout:.0f}s: {what}; {check.__doc__ or ''}"
        )
        time.sleep(0.05)


def test_a_partition_after_the_votes_leaves_a_3pc_trip_partial(tmp_path: Path) -> None:
    env = {
        **isolated_env(),
        "TRIPMESH_3PC_WAIT_TIMEOUT": "6",
        "TRIPMESH_3PC_PRECOMMIT_TIMEOUT": "30",
        "TRIPMESH_FAILPOINTS": "3pc.before_decision=sleep:2",
    }
    mesh = start(tmp_path / "mesh", env)
    lay = mesh.layout
    books = Books.open(lay.client_address, {k: lay.address(k) for k in PARTICIPANTS})
    toxiproxy = Toxiproxy(lay.host, lay.ports[TOXIPROXY])
    try:
        request = cpb.BookTripRequest(
            idempotency_key="partitioned",
            customer_id="c",
            protocol=cpb.PROTOCOL_THREE_PHASE_COMMIT,
            flight=cpb.FlightSelection(flight_id="JL5", date=day(30), seats=1),
            hotel=cpb.HotelSelection(hotel_id="TOKYO-GRAND", check_in=day(30), nights=2, rooms=1),
            car=cpb.CarSelection(car_id="CAMRY-NRT", pickup_date=day(30), days=2, cars=1),
        )

        def book() -> None:
            try:
                books.coordinator.BookTrip(request, timeout=10)
            except grpc.RpcError:
                pass  # the trip is judged from the books

        booking = threading.Thread(target=book)
        booking.start()

        def car_status() -> int:
            rows = books.reservations("car")
            return rows[0].status if rows else 0

        # Every vote is in (the car holds); the coordinator sleeps before PRE_COMMIT.
        _wait(lambda: car_status() == ppb.RESERVATION_STATUS_HELD, 10, "the car votes yes")
        toxiproxy.disable(CAR_EDGE)

        def statuses() -> dict[str, int]:
            return {
                k: (rows[0].status if (rows := books.reservations(k)) else 0) for k in PARTICIPANTS
            }

        confirmed, released = ppb.RESERVATION_STATUS_CONFIRMED, ppb.RESERVATION_STATUS_RELEASED
        seen: list[dict[str, int]] = []

        def partial() -> bool:
            seen.append(statuses())
            return seen[-1] == {"flight": confirmed, "hotel": confirmed, "car": released}

        try:
            _wait(partial, 30, "flight and hotel commit while the cut-off car aborts on its own")
        except AssertionError:
            print(seen[-1], [r for k in PARTICIPANTS for r in books.reservations(k)])
            print(mesh.tail("coordinator", 40))
            raise
        _wait(
            lambda: statuses() == {"flight": confirmed, "hotel": confirmed, "car": released},
            30,
            "flight and hotel commit while the cut-off car aborts on its own",
        )
        car = books.reservations("car")[0]
        assert car.settled_by == "timeout" and "no PreCommit" in car.reason
        assert {r.settled_by for k in ("flight", "hotel") for r in books.reservations(k)} == {
            "coordinator"
        }
        booking.join(15)

        toxiproxy.enable(CAR_EDGE)  # the partition heals: DoCommit reaches a car that aborted
        trip_id = car.trip_id

        def trip() -> cpb.Trip:
            return books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=trip_id), timeout=5)

        _wait(lambda: trip().attention == cpb.ATTENTION_PHASE2_REJECTED, 30, "DoCommit refused")
        final = trip()
        assert final.status == cpb.TRIP_STATUS_NEEDS_ATTENTION
        assert final.decision == cpb.DECISION_COMMIT
        assert "car" in final.attention_detail and "timeout" in final.attention_detail
        pre_commit = [e.detail for e in final.events if e.kind == "decision"]
        assert any("presumed failed" in d and "car" in d for d in pre_commit), pre_commit

        # The independent checker finds the partial trip.
        snapshot = read_books(lay.address("coordinator"), {k: lay.address(k) for k in PARTICIPANTS})
        result = checker.all_or_nothing(snapshot)
        assert result.verdict == "invalid"
        assert result.count == 1 and result.first is not None
        assert result.first.trip_id == trip_id
        assert "still takes flight, hotel" in result.first.what
    finally:
        books.close()
        stop_and_check(mesh, env)
