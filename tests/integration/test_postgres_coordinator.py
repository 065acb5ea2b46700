"""The coordinator with its trip log on a real PostgreSQL server (`--store postgresql://...`).

Real participants, a real coordinator process, a real server started for this
module (tests.postgres): trips book in every protocol the cluster runs, the log
is in PostgreSQL (read there, not from the coordinator), a coordinator killed
mid-2PC recovers from it, and a log that cannot be reached is refused loudly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import grpc
import psycopg
import pytest

from tests.books import trip_request
from tests.postgres import fresh_database, postgres_server
from tripmesh.runtime.postgres import PostgresServer
from tripmesh.v1 import coordinator_pb2 as cpb

CONFIRMED = cpb.TRIP_STATUS_CONFIRMED


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with postgres_server() as started:
        yield started


def _logged(dsn: str) -> dict[str, str]:
    """trip id -> status, as the PostgreSQL log holds them."""
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT trip_id, status FROM trips").fetchall())


def test_trips_book_in_every_protocol_with_the_log_in_postgresql(
    make_cluster, server: PostgresServer
) -> None:
    dsn = fresh_database(server)
    cluster, books = make_cluster(coordinator_args=["--store", dsn])
    booked = {}
    for i, protocol in enumerate(
        (cpb.PROTOCOL_SAGA, cpb.PROTOCOL_TWO_PHASE_COMMIT, cpb.PROTOCOL_THREE_PHASE_COMMIT)
    ):
        request = trip_request(f"pg-{i}", protocol, flight="FX", hotel="H", car="C", offset=i)
        trip = books.coordinator.BookTrip(request, timeout=15).trip
        assert trip.status == CONFIRMED, trip
        books.assert_all_or_nothing(trip)
        booked[trip.trip_id] = "confirmed"
    assert _logged(dsn) == booked
    assert not (cluster.data_dir / "coordinator.db").exists()  # nothing went to SQLite
    # A sold-out car: the saga compensates, and the log says so.
    request = trip_request(
        "pg-sold-out", cpb.PROTOCOL_SAGA, flight="FX", hotel="H", car="C-SOLD-OUT"
    )
    trip = books.coordinator.BookTrip(request, timeout=15).trip
    assert trip.status == cpb.TRIP_STATUS_ABORTED
    books.assert_all_or_nothing(trip)
    assert _logged(dsn)[trip.trip_id] == "aborted"


def test_a_coordinator_killed_after_its_2pc_decision_finishes_the_trip_from_postgresql(
    make_cluster, server: PostgresServer
) -> None:
    dsn = fresh_database(server)
    cluster, books = make_cluster(
        coordinator_args=["--store", dsn],
        coordinator_env={"TRIPMESH_FAILPOINTS": "2pc.after_decision=crash"},
    )
    request = trip_request(
        "pg-crash", cpb.PROTOCOL_TWO_PHASE_COMMIT, flight="FX", hotel="H", car="C"
    )
    with pytest.raises(grpc.RpcError) as caught:
        books.coordinator.BookTrip(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert cluster.coordinator.wait_exit() == -signal.SIGKILL
    assert list(_logged(dsn).values()) == ["pending"]  # decided, not yet finished
    cluster.coordinator.start(extra_env={"TRIPMESH_FAILPOINTS": ""})
    again = books.coordinator.BookTrip(request, timeout=10)
    assert again.replayed
    trip = books.wait_trip(again.trip.trip_id)
    assert trip.status == CONFIRMED, trip
    books.assert_all_or_nothing(trip)
    assert books.totals("flight", "FX") == (0, 1)
    assert _logged(dsn) == {trip.trip_id: "confirmed"}


@pytest.mark.parametrize(
    ("store", "says"),
    [
        ("mysql://db/trips", "--store 'mysql://db/trips': not a PostgreSQL connection string"),
        ("postgresql://tripmesh@127.0.0.1:1/trips", "--store: storage unavailable (PostgreSQL"),
    ],
    ids=["not-postgresql", "nobody-there"],
)
def test_a_trip_log_that_cannot_be_used_is_refused_at_start(
    tmp_path, store: str, says: str
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.server",
            "--data-dir",
            str(tmp_path),
            "--store",
            store,
            "--admin-listen",
            "",
            "--broker",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert says in done.stderr, done.stderr[-2000:]
