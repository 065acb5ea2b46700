"""Done-when 3 and 4: processes killed with SIGKILL at exact protocol steps, then restarted.

Failpoints (TRIPMESH_FAILPOINTS) make a process SIGKILL itself at a named step,
so the crash lands exactly there every time. After the restart, every trip
must reach a terminal state with all-or-nothing intact.
"""

from __future__ import annotations

import signal

import grpc
import pytest

from tests.books import eventually, trip_request
from tripmesh.runtime.database import connect
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import participant_pb2 as ppb

TWO_PC, SAGA = cpb.PROTOCOL_TWO_PHASE_COMMIT, cpb.PROTOCOL_SAGA
THREE_PC = cpb.PROTOCOL_THREE_PHASE_COMMIT
CONFIRMED, ABORTED = cpb.TRIP_STATUS_CONFIRMED, cpb.TRIP_STATUS_ABORTED


def _book_into_crash(books, cluster, request: cpb.BookTripRequest) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        books.coordinator.BookTrip(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert cluster.coordinator.wait_exit() == -signal.SIGKILL


@pytest.mark.parametrize(
    ("failpoint", "protocol", "car", "expected"),
    [
        pytest.param("2pc.before_decision", TWO_PC, "C", ABORTED, id="2pc-before-decision"),
        pytest.param("2pc.after_decision", TWO_PC, "C", CONFIRMED, id="2pc-after-decision"),
        pytest.param("2pc.between_phase2", TWO_PC, "C", CONFIRMED, id="2pc-between-phase2"),
        pytest.param("2pc.between_phase2", TWO_PC, "C-SOLD-OUT", ABORTED, id="2pc-between-aborts"),
        pytest.param("3pc.before_decision", THREE_PC, "C", ABORTED, id="3pc-before-decision"),
        pytest.param(
            "3pc.after_precommit_decision", THREE_PC, "C", CONFIRMED, id="3pc-after-pre-commit"
        ),
        pytest.param("3pc.between_docommits", THREE_PC, "C", CONFIRMED, id="3pc-between-docommits"),
        pytest.param(
            "3pc.between_docommits", THREE_PC, "C-SOLD-OUT", ABORTED, id="3pc-between-aborts"
        ),
        pytest.param("saga.after_step_rpc", SAGA, "C", CONFIRMED, id="saga-after-step"),
        pytest.param(
            "saga.mid_compensation", SAGA, "C-SOLD-OUT", ABORTED, id="saga-mid-compensation"
        ),
    ],
)
def test_coordinator_killed_mid_protocol_recovers(
    make_cluster, failpoint: str, protocol: int, car: str, expected: int
) -> None:
    cluster, books = make_cluster(coordinator_env={"TRIPMESH_FAILPOINTS": f"{failpoint}=crash"})
    request = trip_request("crash-1", protocol, flight="FX", hotel="H", car=car)
    _book_into_crash(books, cluster, request)

    # The crash left the trip unfinished in the coordinator's log...
    log = connect(cluster.data_dir / "coordinator.db", readonly=True)
    (status,) = log.execute("SELECT status FROM trips").fetchone()
    log.close()
    assert status == "pending"
    # ...and, but for an abort whose releases all landed before the kill,
    # something taken at a participant.
    taken = [books.totals(k, r) for k, r in (("flight", "FX"), ("hotel", "H"), ("car", car))]
    if failpoint not in ("2pc.between_phase2", "3pc.between_docommits") or expected == CONFIRMED:
        assert any(held or confirmed for held, confirmed in taken), taken

    cluster.coordinator.start(extra_env={"TRIPMESH_FAILPOINTS": ""})
    # The same key finds the same trip: nothing was lost or started twice.
    again = books.coordinator.BookTrip(request, timeout=10)
    assert again.replayed
    trip = books.wait_trip(again.trip.trip_id)
    assert trip.status == expected, trip
    books.assert_all_or_nothing(trip)
    confirmed = 1 if expected == CONFIRMED else 0
    assert books.totals("flight", "FX") == (0, confirmed)
    assert books.totals("hotel", "H") == (0, 2 * confirmed)
    assert (
        "recovery" in cluster.coordinator.log_text() or "resuming" in cluster.coordinator.log_text()
    )


def _held_in_file(cluster, kind: str, trip_id: str) -> tuple[str, int]:
    """Read the dead participant's SQLite file directly: its reservation status and held units."""
    conn = connect(cluster.data_dir / f"{kind}.db", readonly=True)
    try:
        (status,) = conn.execute(
            "SELECT status FROM reservations WHERE trip_id = ?", (trip_id,)
        ).fetchone()
        (held,) = conn.execute("SELECT coalesce(sum(held), 0) FROM inventory").fetchone()
        return status, held
    finally:
        conn.close()


def test_participant_killed_after_voting_yes_learns_abort(make_cluster) -> None:
    cluster, books = make_cluster()
    flight = cluster.services["flight"]
    flight.restart(extra_env={"TRIPMESH_FAILPOINTS": "participant.after_vote_yes=crash"})
    reply = books.coordinator.BookTrip(
        trip_request("p1", TWO_PC, flight="FX", hotel="H", car="C"), timeout=5
    )
    trip_id = reply.trip.trip_id
    assert flight.wait_exit() == -signal.SIGKILL
    # Its vote never arrived, so the coordinator decided ABORT...
    trip = books.wait_trip(trip_id, lambda t: t.decision == cpb.DECISION_ABORT)
    # ...but the dead participant had durably voted yes: it still holds.
    assert _held_in_file(cluster, "flight", trip_id) == ("held", 1)

    flight.start(extra_env={"TRIPMESH_FAILPOINTS": ""})
    trip = books.wait_trip(trip_id)
    assert trip.status == cpb.TRIP_STATUS_ABORTED
    books.assert_all_or_nothing(trip)
    (reservation,) = books.reservations("flight", trip_id)
    assert reservation.status == ppb.RESERVATION_STATUS_RELEASED
    assert books.totals("flight", "FX") == (0, 0)


def test_participant_killed_before_commit_learns_commit(make_cluster) -> None:
    cluster, books = make_cluster()
    hotel = cluster.services["hotel"]
    hotel.restart(extra_env={"TRIPMESH_FAILPOINTS": "participant.before_commit=crash"})
    reply = books.coordinator.BookTrip(
        trip_request("p2", TWO_PC, flight="FX", hotel="H", car="C"), timeout=5
    )
    trip_id = reply.trip.trip_id
    assert hotel.wait_exit() == -signal.SIGKILL
    assert reply.trip.decision == cpb.DECISION_COMMIT
    assert reply.trip.status == cpb.TRIP_STATUS_PENDING  # the hotel has not acknowledged
    assert _held_in_file(cluster, "hotel", trip_id) == ("held", 2)

    hotel.start(extra_env={"TRIPMESH_FAILPOINTS": ""})
    trip = books.wait_trip(trip_id)
    assert trip.status == cpb.TRIP_STATUS_CONFIRMED
    books.assert_all_or_nothing(trip)
    eventually(lambda: _assert_equal(books.totals("hotel", "H"), (0, 2)))


def test_prepared_participant_asks_the_coordinator(make_cluster) -> None:
    """A hold whose phase 2 never arrives is settled by the participant asking, not by a timer."""
    cluster, books = make_cluster(
        coordinator_env={"TRIPMESH_FAILPOINTS": "2pc.after_decision=crash"}
    )
    request = trip_request("ask", TWO_PC, flight="FX", hotel="H", car="C")
    _book_into_crash(books, cluster, request)
    # Every participant holds, and nobody will push the decision to them while
    # the coordinator is down: holding is correct, releasing would not be.
    for kind, rid in (("flight", "FX"), ("hotel", "H"), ("car", "C")):
        assert books.totals(kind, rid)[0] > 0
    cluster.coordinator.start(extra_env={"TRIPMESH_FAILPOINTS": ""})
    trip_id = books.coordinator.BookTrip(request, timeout=10).trip.trip_id
    trip = books.wait_trip(trip_id)
    assert trip.status == cpb.TRIP_STATUS_CONFIRMED
    books.assert_all_or_nothing(trip)
    settled_by = {
        kind: books.reservations(kind, trip_id)[0].settled_by for kind in books.participants
    }
    assert set(settled_by.values()) <= {"coordinator", "resolver"}, settled_by


def _assert_equal(a: object, b: object) -> None:
    assert a == b, (a, b)


def test_a_slow_2pc_phase2_is_driven_on_after_a_coordinator_restart(make_cluster) -> None:
    """NEEDS_ATTENTION while phase 2 outlasts the policy does not stop it: a restart resumes it."""
    cluster, books = make_cluster(coordinator_args=["--compensation-give-up", "1"])
    hotel = cluster.services["hotel"]
    hotel.restart(extra_env={"TRIPMESH_FAILPOINTS": "participant.before_commit=crash"})
    reply = books.coordinator.BookTrip(
        trip_request("slow-phase2", TWO_PC, flight="FX", hotel="H", car="C"), timeout=5
    )
    trip_id = reply.trip.trip_id
    assert hotel.wait_exit() == -signal.SIGKILL
    trip = books.wait_trip(trip_id, lambda t: t.status == cpb.TRIP_STATUS_NEEDS_ATTENTION)
    assert trip.decision == cpb.DECISION_COMMIT

    # The coordinator dies while the hotel is still down, and comes back first.
    cluster.coordinator.kill()
    cluster.coordinator.start()
    hotel.start(extra_env={"TRIPMESH_FAILPOINTS": ""})
    # The hotel settles its hold either way (its resolver asks at start-up); only
    # a coordinator that drives phase 2 again sees every acknowledgement and
    # finishes the trip.
    trip = books.wait_trip(trip_id, timeout=20)
    assert trip.status == cpb.TRIP_STATUS_CONFIRMED, trip
    books.assert_all_or_nothing(trip)
    assert "resuming 1 unfinished trips" in cluster.coordinator.log_text()
