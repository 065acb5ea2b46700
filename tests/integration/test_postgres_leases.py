"""Several coordinators on one PostgreSQL trip log: one driver per trip, by leases and fencing.

First the store on its own (two `PostgresTripStore`s named as two coordinators, on
a real server): a live lease keeps the other off; an expired one is taken over,
raising the trip's fencing number, after which the old holder can write nothing;
a coordinator restarted under its own name takes its trips back at once. Then
real coordinator processes over real participants: one SIGKILLed at each of its
crash points (2PC, 3PC, saga), the other finishes its trip within the lease and
a few seconds, all or nothing; one frozen with SIGSTOP past its lease,
the other finishes its trip, and the frozen one, resumed, writes nothing to it.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from coordinator.domain import LegKind, LegRequest, LegStatus, Protocol, TripEvent, TripRequest
from coordinator.journal import Change, LegUpdate
from coordinator.store import LeaseLost
from coordinator.store.postgres import PostgresTripStore
from tests.books import trip_request
from tests.postgres import fresh_database, postgres_server
from tests.procs import Proc
from tripmesh.mesh.layout import free_port
from tripmesh.runtime import tls
from tripmesh.runtime.database import StorageUnavailable
from tripmesh.runtime.postgres import PostgresServer
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import coordinator_pb2_grpc

LEASE = 1.0


def eventually(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll `check` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with postgres_server() as started:
        yield started


def _request(key: str) -> TripRequest:
    leg = LegRequest("X", "2030-01-01", 1, 1)
    return TripRequest(key, "c", Protocol.SAGA, leg, leg, leg)


def _row(dsn: str, trip_id: str) -> tuple[str, int, int]:
    """(owner, fence, events) of a trip, read on a connection of our own."""
    with psycopg.connect(dsn) as conn:
        owner, fence = conn.execute(
            "SELECT owner, fence FROM trips WHERE trip_id = %s", (trip_id,)
        ).fetchone()
        (events,) = conn.execute(
            "SELECT count(*) FROM events WHERE trip_id = %s", (trip_id,)
        ).fetchone()
    return owner, fence, events


def _note(what: str) -> Change:
    return Change(
        (TripEvent("step", "flight", what),), legs={LegKind.FLIGHT: LegUpdate(LegStatus.IN_FLIGHT)}
    )


def test_a_live_lease_keeps_others_off_and_an_expired_one_is_taken_over_and_fenced(
    server: PostgresServer,
) -> None:
    dsn = fresh_database(server)
    a = PostgresTripStore(dsn, replica="a", lease=LEASE)
    b = PostgresTripStore(dsn, replica="b", lease=LEASE)
    try:

        async def go() -> str:
            trip, _ = await a.create(_request("lease-1"))
            await asyncio.sleep(LEASE * 1.5)  # a renews: its lease never lapses
            assert await b.claim_unfinished() == []
            assert not await b.hold_lease(trip.trip_id)
            with pytest.raises(LeaseLost):
                await b.write(trip.trip_id, _note("by b, refused"), time.time())
            await a.write(trip.trip_id, _note("by a"), time.time())
            return trip.trip_id

        trip_id = asyncio.run(go())
        assert _row(dsn, trip_id) == ("a", 1, 2)  # created, and a's line; b wrote nothing
        a._renewing.cancel()  # a stalls: it stops renewing, as a frozen process would
        time.sleep(LEASE * 1.5)

        async def take_over() -> None:
            assert await b.claim_unfinished() == [trip_id]
            await b.write(trip_id, _note("by b"), time.time())
            with pytest.raises(LeaseLost):  # a wakes up: its fence is gone
                await a.write(trip_id, _note("by a, too late"), time.time())
            b.release_lease(trip_id)  # b is done with it; its lease lapses
            await asyncio.sleep(LEASE * 1.5)
            with pytest.raises(LeaseLost):  # a's driver still may not: it lost the trip
                await a.write(trip_id, _note("by a, later still"), time.time())

        asyncio.run(take_over())
        assert _row(dsn, trip_id) == ("b", 2, 3)  # b's line only
    finally:
        a.close()
        b.close()


def test_a_create_that_fails_at_commit_holds_no_lease_and_the_key_is_free_again(
    server: PostgresServer,
) -> None:
    """The store keeps its leases beside the database: they change only with it. A create
    whose COMMIT fails (here a deferred trigger failing as a server shutting down would;
    in the chaos lab, the server SIGKILLed mid-commit) must not leave the trip counted as
    held: a held trip is skipped by this coordinator's own sweep, and a trip that did
    commit would then never be driven (database-crash, 2PC, seed 2: one trip pending for
    good)."""
    dsn = fresh_database(server)
    store = PostgresTripStore(dsn, replica="a", lease=LEASE)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN RAISE EXCEPTION 'shutting down' USING ERRCODE = 'admin_shutdown';"
                " END $$"
            )
            conn.execute(
                "CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON trips"
                " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_at_commit()"
            )
        with pytest.raises(StorageUnavailable, match="while committing"):
            asyncio.run(store.create(_request("commit-lost")))
        assert store._held == {}  # nothing of a create that did not commit
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP TRIGGER fail_at_commit ON trips")
        trip, replayed = asyncio.run(store.create(_request("commit-lost")))
        assert not replayed
        assert store._held == {trip.trip_id: 1}
    finally:
        store.close()


def test_a_coordinator_restarted_under_its_name_takes_its_trips_back_at_once(
    server: PostgresServer,
) -> None:
    dsn = fresh_database(server)
    first = PostgresTripStore(dsn, replica="a", lease=60.0)
    trip, _ = asyncio.run(first.create(_request("lease-2")))
    first.close()  # a crash: its lease (a minute) still runs
    other = PostgresTripStore(dsn, replica="b", lease=60.0)
    again = PostgresTripStore(dsn, replica="a", lease=60.0)
    try:
        assert asyncio.run(other.claim_unfinished()) == []
        assert asyncio.run(again.claim_unfinished()) == [trip.trip_id]
        assert _row(dsn, trip.trip_id)[:2] == ("a", 2)
    finally:
        other.close()
        again.close()


# -- coordinator processes -------------------------------------------------------------


def _second_coordinator(cluster, dsn: str, name: str, extra_env: dict[str, str]) -> Proc:
    """Another coordinator on the same participants and log, on ports of its own."""
    assert cluster.coordinator is not None
    argv = list(cluster.coordinator.argv)
    address = f"127.0.0.1:{free_port()}"
    for flag, value in (
        ("--listen", address),
        ("--operator-listen", ""),
        ("--decisions-listen", f"127.0.0.1:{free_port()}"),
        ("--admin-listen", ""),
        ("--replica", name),
    ):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return Proc(name, argv, extra_env, address, cluster.data_dir / f"{name}.log").start()


def _shared(dsn: str, name: str, failpoints: str = "") -> dict:
    return {
        "coordinator_args": [
            "--store",
            dsn,
            "--lease",
            str(LEASE),
            "--sweep-every",
            "0.5",
            "--replica",
            name,
        ],
        "coordinator_env": {"TRIPMESH_FAILPOINTS": failpoints} if failpoints else {},
    }


# Every crash point of a coordinator driving a trip (chaos/scenarios/failpoints.py names
# the same), the car the trip asks for (sold out: the saga compensates), and how the
# survivor must end it: before a 2PC/3PC decision, presumed abort; after it, its outcome.
KILLED_AT = {
    "2pc.before_decision": (cpb.PROTOCOL_TWO_PHASE_COMMIT, "C", cpb.TRIP_STATUS_ABORTED),
    "2pc.after_decision": (cpb.PROTOCOL_TWO_PHASE_COMMIT, "C", cpb.TRIP_STATUS_CONFIRMED),
    "2pc.between_phase2": (cpb.PROTOCOL_TWO_PHASE_COMMIT, "C", cpb.TRIP_STATUS_CONFIRMED),
    "3pc.before_decision": (cpb.PROTOCOL_THREE_PHASE_COMMIT, "C", cpb.TRIP_STATUS_ABORTED),
    "3pc.after_precommit_decision": (
        cpb.PROTOCOL_THREE_PHASE_COMMIT,
        "C",
        cpb.TRIP_STATUS_CONFIRMED,
    ),
    "3pc.between_docommits": (cpb.PROTOCOL_THREE_PHASE_COMMIT, "C", cpb.TRIP_STATUS_CONFIRMED),
    "saga.after_step_rpc": (cpb.PROTOCOL_SAGA, "C", cpb.TRIP_STATUS_CONFIRMED),
    "saga.mid_compensation": (cpb.PROTOCOL_SAGA, "C-SOLD-OUT", cpb.TRIP_STATUS_ABORTED),
}


@pytest.mark.parametrize("failpoint", KILLED_AT)
def test_the_survivor_finishes_a_trip_whose_coordinator_was_killed_at_each_failpoint(
    make_cluster, server: PostgresServer, failpoint: str
) -> None:
    protocol, car, outcome = KILLED_AT[failpoint]
    dsn = fresh_database(server)
    cluster, books = make_cluster(**_shared(dsn, "a", f"{failpoint}=crash"))
    survivor = _second_coordinator(cluster, dsn, "b", {})
    try:
        request = trip_request(f"lease-kill-{failpoint}", protocol, flight="FX", hotel="H", car=car)
        with pytest.raises(grpc.RpcError):
            books.coordinator.BookTrip(request, timeout=10)
        killed_at = time.monotonic()
        assert cluster.coordinator.wait_exit() == -signal.SIGKILL
        with psycopg.connect(dsn) as conn:
            (trip_id,) = conn.execute("SELECT trip_id FROM trips").fetchone()

        def finished() -> bool:
            with psycopg.connect(dsn) as conn:
                (status,) = conn.execute(
                    "SELECT status FROM trips WHERE trip_id = %s", (trip_id,)
                ).fetchone()
            return status in ("confirmed", "aborted")

        eventually(finished, timeout=LEASE + 8, what="the survivor finishes the trip")
        took = time.monotonic() - killed_at
        assert took < LEASE + 5, took
        owner, fence, _ = _row(dsn, trip_id)
        assert (owner, fence) == ("b", 2)  # taken over once, by the survivor
        trip = _get_trip(survivor, trip_id)  # a is dead: ask b
        assert trip.status == outcome, trip
        # All or nothing on the participants' own books, and nothing left held.
        books.assert_all_or_nothing(trip)
        held, confirmed = books.totals("flight", "FX")
        assert held == 0
        assert confirmed == (1 if outcome == cpb.TRIP_STATUS_CONFIRMED else 0)
    finally:
        survivor.stop()


def test_a_coordinator_frozen_past_its_lease_writes_nothing_once_resumed(
    make_cluster, server: PostgresServer, tmp_path: Path
) -> None:
    dsn = fresh_database(server)
    marks = tmp_path / "fired"
    marks.mkdir()
    cluster, books = make_cluster(**_shared(dsn, "a", "2pc.after_decision=sleep:3"))
    cluster.coordinator.stop()
    cluster.coordinator.start(extra_env={"TRIPMESH_FAILPOINT_DIR": str(marks)})
    survivor = _second_coordinator(cluster, dsn, "b", {})
    try:
        request = trip_request(
            "lease-freeze", cpb.PROTOCOL_TWO_PHASE_COMMIT, flight="FX", hotel="H", car="C"
        )
        answered: list[object] = []
        booking = threading.Thread(
            target=lambda: answered.append(_book(books, request)), daemon=True
        )
        booking.start()
        eventually(lambda: any(marks.iterdir()), timeout=10, what="a reaches its decision")
        cluster.coordinator.signal(signal.SIGSTOP)  # frozen: its lease is not renewed
        with psycopg.connect(dsn) as conn:
            (trip_id,) = conn.execute("SELECT trip_id FROM trips").fetchone()
        eventually(lambda: _row(dsn, trip_id)[0] == "b", timeout=LEASE + 5, what="b takes over")
        eventually(
            lambda: _get_trip(survivor, trip_id).status == cpb.TRIP_STATUS_CONFIRMED,
            timeout=15,
            what="b drives it to the end",
        )
        owner, fence, events = _row(dsn, trip_id)
        cluster.coordinator.signal(signal.SIGCONT)  # a wakes, mid-trip, sure it holds it
        eventually(
            lambda: "another coordinator holds its lease" in cluster.coordinator.log_text(),
            timeout=15,
            what="a finds its lease lost",
        )
        assert _row(dsn, trip_id) == (owner, fence, events)  # a wrote nothing
        books.assert_all_or_nothing(_get_trip(survivor, trip_id))
        assert books.totals("flight", "FX") == (0, 1)
        booking.join(15)
    finally:
        cluster.coordinator.signal(signal.SIGCONT)
        survivor.stop()


def _get_trip(coordinator: Proc, trip_id: str) -> cpb.Trip:
    with grpc.insecure_channel(coordinator.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        return stub.GetTrip(cpb.GetTripRequest(trip_id=trip_id), timeout=5)


def _book(books, request: cpb.BookTripRequest) -> object:
    try:
        return books.coordinator.BookTrip(request, timeout=20)
    except grpc.RpcError as exc:
        return exc.code()


def test_a_channel_over_both_coordinators_books_on_each_and_keeps_booking_when_one_dies(
    make_cluster, server: PostgresServer
) -> None:
    dsn = fresh_database(server)
    cluster, books = make_cluster(**_shared(dsn, "a"))
    other = _second_coordinator(cluster, dsn, "b", {})
    assert cluster.coordinator is not None
    both = f"{cluster.coordinator.address},{other.address}"
    try:
        with tls.dial(both) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)

            def book(key: str, i: int) -> str:
                request = trip_request(
                    key, cpb.PROTOCOL_SAGA, flight="FX", hotel="H", car="C", offset=i % 5
                )
                try:
                    reply = stub.BookTrip(request, timeout=10)
                except grpc.RpcError as exc:  # the replica died under the call: same key again
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    reply = stub.BookTrip(request, timeout=10)
                assert reply.trip.status == cpb.TRIP_STATUS_CONFIRMED, reply.trip
                return reply.trip.trip_id

            first = [book(f"rr-{i}", i) for i in range(8)]
            owners = {_row(dsn, t)[0] for t in first}
            assert owners == {"a", "b"}  # round robin: each replica created some
            cluster.coordinator.kill()
            after = [book(f"rr-after-{i}", i) for i in range(8)]
            assert {_row(dsn, t)[0] for t in after} == {"b"}
            for trip_id in first + after:
                books.assert_all_or_nothing(_get_trip(other, trip_id))
    finally:
        other.stop()
