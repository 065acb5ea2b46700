"""The PostgreSQL trip store against a real PostgreSQL server, and beside it the SQLite store
on the same tests: the two backends behave the same.

One server for the module (tests/postgres.py), a fresh database for each test;
the crash test has a server of its own, which it kills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from coordinator.domain import (
    Attention,
    CoordinatorError,
    Decision,
    LegKind,
    LegRequest,
    LegStatus,
    Protocol,
    TripEvent,
    TripRequest,
    TripStatus,
)
from coordinator.journal import Change, LegUpdate
from coordinator.store import TripQuery, TripStore
from coordinator.store.postgres import PostgresTripStore
from coordinator.store.sqlite import SqliteTripStore
from tests.postgres import free_port, fresh_database, postgres_server
from tripmesh.runtime.database import StorageUnavailable
from tripmesh.runtime.errors import ErrorKind
from tripmesh.runtime.pgdatabase import How, PostgresDatabase
from tripmesh.runtime.postgres import PostgresServer
from tripmesh.v1 import events_pb2 as epb

T = TypeVar("T")


def run(work: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(work)


def request(
    key: str = "k", customer: str = "c", protocol: Protocol = Protocol.SAGA, days: int = 1
) -> TripRequest:
    leg = LegRequest("X", "2030-01-01", days, 1)
    return TripRequest(key, customer, protocol, leg, leg, leg)


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with postgres_server() as started:
        yield started


@dataclass
class Backend:
    name: str
    store: TripStore
    #: Runs one SQL statement ('?' placeholders) on a connection of its own, committed.
    execute: Callable[..., list[tuple[Any, ...]]]

    def count(self, table: str) -> int:
        return int(self.execute(f"SELECT count(*) FROM {table}")[0][0])


def _sqlite_execute(path: Path) -> Callable[..., list[tuple[Any, ...]]]:
    def execute(sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            return list(conn.execute(sql, tuple(args)).fetchall())

    return execute


def _postgres_execute(dsn: str) -> Callable[..., list[tuple[Any, ...]]]:
    def execute(sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(dsn) as conn:
            cur = conn.execute(sql.replace("?", "%s"), tuple(args))
            return list(cur.fetchall()) if cur.description else []

    return execute


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A fresh, empty store of each kind (the server is started only for postgres)."""
    if request.param == "sqlite":
        path = tmp_path / "trips.db"
        made = Backend("sqlite", SqliteTripStore(path), _sqlite_execute(path))
    else:
        dsn = fresh_database(request.getfixturevalue("server"))
        made = Backend("postgres", PostgresTripStore(dsn, max_size=8), _postgres_execute(dsn))
    try:
        yield made
    finally:
        made.store.close()


@pytest.fixture
def dsn(server: PostgresServer) -> str:
    return fresh_database(server)


# -- create ------------------------------------------------------------------------


def test_a_created_trip_reads_back_as_it_was_answered(backend: Backend) -> None:
    async def go():
        created, replayed = await backend.store.create(request(protocol=Protocol.TWO_PHASE_COMMIT))
        return created, replayed, await backend.store.get(created.trip_id), created.trip_id

    created, replayed, stored, trip_id = run(go())
    assert not replayed
    assert stored == created
    assert stored.request == request(protocol=Protocol.TWO_PHASE_COMMIT)
    assert stored.status is TripStatus.PENDING and stored.decision is None
    assert [leg.kind for leg in stored.legs] == [LegKind.FLIGHT, LegKind.HOTEL, LegKind.CAR]
    assert {leg.status for leg in stored.legs} == {LegStatus.NOT_STARTED}
    assert stored.leg(LegKind.HOTEL).reservation_id == f"{trip_id}-hotel"
    assert [e.kind for e in run(backend.store.events(trip_id))] == ["created"]
    assert run(backend.store.get("trip-unknown")) is None


def test_the_same_key_and_request_replay_the_first_trip(backend: Backend) -> None:
    async def go():
        first, _ = await backend.store.create(request())
        again, replayed = await backend.store.create(request())
        return first, again, replayed

    first, again, replayed = run(go())
    assert replayed
    assert again == first
    assert backend.count("trips") == 1


def test_the_same_key_with_another_request_is_a_conflict(backend: Backend) -> None:
    async def go():
        first, _ = await backend.store.create(request(days=1))
        with pytest.raises(CoordinatorError) as raised:
            await backend.store.create(request(days=2))
        return first, raised.value

    first, error = run(go())
    assert error.kind is ErrorKind.CONFLICT
    assert first.trip_id in error.message
    assert backend.count("trips") == 1
    assert backend.count("legs") == 3


def test_twenty_concurrent_creates_of_one_key_make_one_trip(backend: Backend) -> None:
    async def go():
        return await asyncio.gather(*(backend.store.create(request()) for _ in range(20)))

    answers = run(go())
    assert len({trip.trip_id for trip, _ in answers}) == 1
    assert sorted(replayed for _, replayed in answers) == [False] + [True] * 19
    assert backend.count("trips") == 1
    assert backend.count("legs") == 3
    assert backend.count("idempotency_keys") == 1
    assert backend.count("events") == 1


def test_two_coordinators_creating_one_key_at_once_make_one_trip(dsn: str) -> None:
    """Two stores (two processes' worth of pools) on one database, racing on every key."""
    one, two = PostgresTripStore(dsn, max_size=8), PostgresTripStore(dsn, max_size=8)
    try:

        async def go():
            calls = [
                store.create(request(key=f"k{i % 5}"))
                for i in range(40)
                for store in ((one, two) if i % 2 else (two, one))
            ]
            return await asyncio.gather(*calls)

        answers = run(go())
    finally:
        one.close()
        two.close()
    execute = _postgres_execute(dsn)
    assert sum(not replayed for _, replayed in answers) == 5
    assert len({trip.trip_id for trip, _ in answers}) == 5
    assert execute("SELECT count(*) FROM trips")[0][0] == 5
    assert execute("SELECT count(*) FROM legs")[0][0] == 15


# -- write -------------------------------------------------------------------------


def test_a_write_applies_its_change_and_get_and_events_show_it(backend: Backend) -> None:
    store = backend.store
    changes = [
        Change(
            (TripEvent("decision", detail="commit", at=10.0),),
            decision=Decision.COMMIT,
            legs={
                LegKind.FLIGHT: LegUpdate(LegStatus.HELD, price_cents=1250),
                LegKind.CAR: LegUpdate(LegStatus.REFUSED, reason="sold out"),
            },
            failure_reason="car: sold out",
        ),
        Change(
            (TripEvent("attention", detail="slow", actor="ops", at=11.0),),
            status=TripStatus.NEEDS_ATTENTION,
            attention=Attention.PHASE2_SLOW,
            attention_detail="hotel silent",
        ),
        Change(
            (TripEvent("finished", at=12.0),),
            status=TripStatus.CONFIRMED,
            legs={LegKind.HOTEL: LegUpdate(LegStatus.CONFIRMED)},  # keeps its price
        ),
    ]

    async def go():
        trip, _ = await store.create(request(protocol=Protocol.TWO_PHASE_COMMIT))
        seen = []
        for now, change in enumerate(changes, start=100):
            await store.write(trip.trip_id, change, float(now))
            trip = change.apply(trip, float(now))  # the journal's model of the write
            seen.append((trip, await store.get(trip.trip_id)))
        return trip.trip_id, seen, await store.events(trip.trip_id)

    _, seen, events = run(go())
    for expected, stored in seen:
        assert stored == expected
    middle, last = seen[1][1], seen[2][1]
    assert middle.attention is Attention.PHASE2_SLOW and middle.attention_detail == "hotel silent"
    assert middle.failure_reason == "car: sold out"
    assert last.status is TripStatus.CONFIRMED and last.attention is None
    assert last.decision is Decision.COMMIT and last.updated_at == 102.0
    assert last.leg(LegKind.FLIGHT).price_cents == 1250
    assert last.leg(LegKind.CAR).reason == "sold out"
    assert [(e.kind, e.actor, e.at) for e in events[1:]] == [
        ("decision", "coordinator", 10.0),
        ("attention", "ops", 11.0),
        ("finished", "coordinator", 12.0),
    ]


def test_writes_of_one_trip_in_flight_at_once_apply_in_the_order_issued(backend: Backend) -> None:
    """2PC's phase 2 has several writes of one trip in flight; the journal relies on the
    store applying them in the order they were issued."""
    kinds = list(LegKind)

    async def go():
        trip, _ = await backend.store.create(request())
        writes = [
            backend.store.write(
                trip.trip_id,
                Change(
                    (TripEvent(f"step{i}", at=float(i)),),
                    legs={kinds[i % 3]: LegUpdate(LegStatus.HELD, reason=f"r{i}")},
                ),
                float(i),
            )
            for i in range(30)
        ]
        await asyncio.gather(*writes)
        return await backend.store.get(trip.trip_id), await backend.store.events(trip.trip_id)

    trip, events = run(go())
    assert [e.kind for e in events] == ["created"] + [f"step{i}" for i in range(30)]
    assert trip.updated_at == 29.0
    assert [leg.reason for leg in trip.legs] == ["r27", "r28", "r29"]


def _told(event_id: str) -> tuple[epb.SagaEvent, str]:
    return epb.SagaEvent(event_id=event_id, source="coordinator"), f"trips.{event_id}"


async def _pending(backend: Backend) -> list[tuple[int, str, str, bytes]]:
    return await backend.store.outbox.pending()


def test_told_events_wait_in_the_outbox_until_marked(backend: Backend) -> None:
    async def go():
        trip, _ = await backend.store.create(request())
        change = Change((TripEvent("requested"),))
        await backend.store.write(trip.trip_id, change, 1.0, tell=[_told("a"), _told("b")])
        await backend.store.write(trip.trip_id, change, 2.0, tell=[_told("a"), _told("c")])
        return await _pending(backend)

    pending = run(go())
    assert [(event_id, subject) for _, event_id, subject, _ in pending] == [
        ("a", "trips.a"),
        ("b", "trips.b"),
        ("c", "trips.c"),
    ]
    assert [s for s, *_ in pending] == sorted(s for s, *_ in pending)
    assert epb.SagaEvent.FromString(pending[1][3]) == _told("b")[0]


def test_outbox_pending_pages_oldest_first_and_mark_takes_rows_out(dsn: str) -> None:
    store = PostgresTripStore(dsn)
    try:

        async def go():
            trip, _ = await store.create(request())
            tell = [_told(f"e{i}") for i in range(5)]
            await store.write(trip.trip_id, Change(), 1.0, tell=tell)
            first = await store.outbox.pending(limit=2)
            await store.outbox.mark([seq for seq, *_ in first])
            return first, await store.outbox.pending(limit=10)

        first, rest = run(go())
        assert store.outbox.depth() == 3  # what the metrics scrape reads
    finally:
        store.close()
    assert [event_id for _, event_id, _, _ in first] == ["e0", "e1"]
    assert [event_id for _, event_id, _, _ in rest] == ["e2", "e3", "e4"]
    published = _postgres_execute(dsn)("SELECT event_id FROM outbox WHERE published_at IS NOT NULL")
    assert sorted(r[0] for r in published) == ["e0", "e1"]


def test_a_write_whose_outbox_row_fails_leaves_nothing_of_itself(dsn: str) -> None:
    """The trip's update, its events and its told events are one transaction: the second
    told event cannot be stored (PostgreSQL text refuses NUL), so neither is the first,
    nor the status."""
    store = PostgresTripStore(dsn)
    try:

        async def go():
            trip, _ = await store.create(request())
            bad = (epb.SagaEvent(event_id="bad"), "trips.\x00")
            with pytest.raises(psycopg.DataError):
                await store.write(
                    trip.trip_id,
                    Change((TripEvent("aborting"),), status=TripStatus.ABORTED),
                    5.0,
                    tell=[_told("good"), bad],
                )
            return trip, await store.get(trip.trip_id), await store.events(trip.trip_id)

        before, after, events = run(go())
    finally:
        store.close()
    assert after == before
    assert [e.kind for e in events] == ["created"]
    assert _postgres_execute(dsn)("SELECT count(*) FROM outbox")[0][0] == 0


# -- the schema's own guarantees ------------------------------------------------------


def test_the_database_refuses_attention_without_its_status_and_the_reverse(
    backend: Backend,
) -> None:
    trip, _ = run(backend.store.create(request()))
    refused = (sqlite3.IntegrityError, psycopg.errors.CheckViolation)
    with pytest.raises(refused):
        backend.execute(
            "UPDATE trips SET status = 'needs_attention' WHERE trip_id = ?", [trip.trip_id]
        )
    with pytest.raises(refused):
        backend.execute(
            "UPDATE trips SET attention = 'phase2_slow' WHERE trip_id = ?", [trip.trip_id]
        )
    with pytest.raises(refused):
        backend.execute("UPDATE trips SET status = 'lost' WHERE trip_id = ?", [trip.trip_id])
    backend.execute(  # both together are what the check allows
        "UPDATE trips SET status = 'needs_attention', attention = 'phase2_slow' WHERE trip_id = ?",
        [trip.trip_id],
    )
    stored = run(backend.store.get(trip.trip_id))
    assert stored.status is TripStatus.NEEDS_ATTENTION
    assert stored.attention is Attention.PHASE2_SLOW


def test_a_database_of_another_schema_version_is_refused(dsn: str) -> None:
    PostgresTripStore(dsn).close()
    execute = _postgres_execute(dsn)
    execute("UPDATE tripmesh_schema SET version = 999")
    with pytest.raises(RuntimeError, match="schema 999"):
        PostgresTripStore(dsn)
    execute("DROP TABLE tripmesh_schema")
    with pytest.raises(RuntimeError, match="another version"):
        PostgresTripStore(dsn)


def test_coordinators_starting_at_once_on_an_empty_database_all_open_it(dsn: str) -> None:
    """Four stores create the schema concurrently; the advisory lock lets one at a time."""
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: PostgresTripStore(dsn, min_size=1), range(4)))
    try:
        trip, _ = run(stores[0].create(request()))
        assert run(stores[3].get(trip.trip_id)) == trip
    finally:
        for store in stores:
            store.close()


def test_a_coordinator_starting_beside_busy_ones_waits_for_no_lock_of_theirs(dsn: str) -> None:
    """A replica restarting under traffic finds the schema written and leaves it alone: it
    must not queue behind (or deadlock with) live writers' table locks. Here a writer holds
    ROW EXCLUSIVE on both tables the schema indexes, as an INSERT does until it commits."""
    PostgresTripStore(dsn).close()
    with psycopg.connect(dsn) as busy:
        busy.execute("LOCK TABLE trips, idempotency_keys IN ROW EXCLUSIVE MODE")
        with ThreadPoolExecutor(1) as pool:
            opening = pool.submit(PostgresTripStore, dsn, min_size=1)
            try:
                store = opening.result(timeout=10)  # TimeoutError if it waits for the lock
            finally:
                busy.rollback()  # lets a blocked opening through, so the test can end
            store.close()


# -- reads -------------------------------------------------------------------------


def test_list_trips_pages_newest_first_and_filters(backend: Backend) -> None:
    store = backend.store
    customers = ["ann", "bob", "ann", "cy", "ann", "bob", "ann"]

    async def go():
        trips = []
        for i, customer in enumerate(customers):
            protocol = Protocol.SAGA if i % 2 else Protocol.TWO_PHASE_COMMIT
            trip, _ = await store.create(
                request(key=f"key{i}", customer=customer, protocol=protocol)
            )
            trips.append(trip)
        await store.write(trips[1].trip_id, Change(status=TripStatus.ABORTED), 1.0)
        await store.write(trips[4].trip_id, Change(status=TripStatus.ABORTED), 1.0)
        pages, position = [], 0
        while True:
            page, following = await store.list_trips(TripQuery(), before=position, limit=3)
            pages.append([t.trip_id for t in page])
            if following is None:
                break
            position = following

        async def ids(query: TripQuery, limit: int = 10) -> list[str]:
            found, following = await store.list_trips(query, before=0, limit=limit)
            assert following is None or limit < 10
            return [t.trip_id for t in found]

        filtered = {
            "aborted": await ids(TripQuery(status=TripStatus.ABORTED)),
            "saga": await ids(TripQuery(protocol=Protocol.SAGA)),
            "ann": await ids(TripQuery(customer_id="ann")),
            "ann 2pc": await ids(TripQuery(customer_id="ann", protocol=Protocol.TWO_PHASE_COMMIT)),
            "key3": await ids(TripQuery(idempotency_key="key3")),
            "text id": await ids(TripQuery(text=trips[5].trip_id)),
            "text key": await ids(TripQuery(text="key2")),
            "text customer": await ids(TripQuery(text="cy")),
            "nobody": await ids(TripQuery(customer_id="zed")),
        }
        first_ann, following = await store.list_trips(
            TripQuery(customer_id="ann"), before=0, limit=2
        )
        second_ann, end = await store.list_trips(
            TripQuery(customer_id="ann"), before=following or 0, limit=2
        )
        ann_pages = [[t.trip_id for t in first_ann], [t.trip_id for t in second_ann], end]
        return [t.trip_id for t in trips], pages, filtered, ann_pages

    ids, pages, filtered, ann_pages = run(go())
    newest_first = ids[::-1]
    assert pages == [newest_first[0:3], newest_first[3:6], newest_first[6:]]
    assert filtered["aborted"] == [ids[4], ids[1]]
    assert filtered["saga"] == [ids[5], ids[3], ids[1]]
    assert filtered["ann"] == [ids[6], ids[4], ids[2], ids[0]]
    assert filtered["ann 2pc"] == [ids[6], ids[4], ids[2], ids[0]]
    assert filtered["key3"] == [ids[3]]
    assert filtered["text id"] == [ids[5]]
    assert filtered["text key"] == [ids[2]]
    assert filtered["text customer"] == [ids[3]]
    assert filtered["nobody"] == []
    assert ann_pages == [[ids[6], ids[4]], [ids[2], ids[0]], None]


def test_list_trips_filters_by_creation_time(backend: Backend) -> None:
    async def go():
        first, _ = await backend.store.create(request(key="a"))
        second, _ = await backend.store.create(request(key="b"))
        split = (first.created_at + second.created_at) / 2
        after, _ = await backend.store.list_trips(
            TripQuery(created_after=second.created_at), before=0, limit=10
        )
        before, _ = await backend.store.list_trips(
            TripQuery(created_before=second.created_at), before=0, limit=10
        )
        return first, second, split, after, before

    first, second, _, after, before = run(go())
    assert [t.trip_id for t in after] == [second.trip_id]
    assert [t.trip_id for t in before] == [first.trip_id]


def test_unfinished_counts_in_doubt_and_decision(backend: Backend) -> None:
    store = backend.store
    two_pc = Protocol.TWO_PHASE_COMMIT

    async def go():
        made = {}
        for name, protocol in [
            ("saga pending", Protocol.SAGA),
            ("2pc decided", two_pc),
            ("2pc slow", two_pc),
            ("saga stuck", Protocol.SAGA),
            ("2pc confirmed", two_pc),
            ("3pc precommit", Protocol.THREE_PHASE_COMMIT),
        ]:
            made[name], _ = await store.create(request(key=name, protocol=protocol))
        ids = {name: trip.trip_id for name, trip in made.items()}
        await store.write(ids["2pc decided"], Change(decision=Decision.COMMIT), 1.0)
        await store.write(
            ids["2pc slow"],
            Change(
                decision=Decision.COMMIT,
                status=TripStatus.NEEDS_ATTENTION,
                attention=Attention.PHASE2_SLOW,
            ),
            1.0,
        )
        await store.write(
            ids["saga stuck"],
            Change(
                decision=Decision.ABORT,
                status=TripStatus.NEEDS_ATTENTION,
                attention=Attention.COMPENSATION_FAILED,
            ),
            1.0,
        )
        await store.write(
            ids["2pc confirmed"], Change(decision=Decision.COMMIT, status=TripStatus.CONFIRMED), 1.0
        )
        await store.write(ids["3pc precommit"], Change(decision=Decision.PRE_COMMIT), 1.0)
        decisions = {name: await store.decision(trip_id) for name, trip_id in ids.items()}
        decisions["unknown"] = await store.decision("trip-unknown")
        return (
            ids,
            await store.unfinished(),
            await store.counts(),
            await store.in_doubt(),
            decisions,
        )

    ids, unfinished, counts, in_doubt, decisions = run(go())
    assert unfinished == [
        ids["saga pending"],
        ids["2pc decided"],
        ids["2pc slow"],
        ids["3pc precommit"],
    ]
    assert counts == {
        TripStatus.PENDING: 3,
        TripStatus.NEEDS_ATTENTION: 2,
        TripStatus.CONFIRMED: 1,
    }
    assert in_doubt == 3  # 2pc decided, 2pc slow, 3pc precommit
    assert decisions == {
        "saga pending": (True, None),
        "2pc decided": (True, Decision.COMMIT),
        "2pc slow": (True, Decision.COMMIT),
        "saga stuck": (True, Decision.ABORT),
        "2pc confirmed": (True, Decision.COMMIT),
        "3pc precommit": (True, Decision.PRE_COMMIT),
        "unknown": (False, None),
    }


def test_purge_keys_forgets_old_keys_and_keeps_their_trips(backend: Backend) -> None:
    store = backend.store
    old, _ = run(store.create(request(key="old")))
    recent, _ = run(store.create(request(key="recent")))
    backend.execute(
        "UPDATE idempotency_keys SET created_at = ? WHERE key = 'old'", [time.time() - 7200]
    )

    async def go():
        purged = await store.purge_keys(older_than=3600)
        again_old, replayed_old = await store.create(request(key="old"))
        again_recent, replayed_recent = await store.create(request(key="recent"))
        return (
            purged,
            again_old,
            replayed_old,
            again_recent,
            replayed_recent,
            await store.get(old.trip_id),
        )

    purged, again_old, replayed_old, again_recent, replayed_recent, kept = run(go())
    assert purged == 1
    assert kept == old  # the trip stays
    assert not replayed_old and again_old.trip_id != old.trip_id  # the key was forgotten
    assert replayed_recent and again_recent == recent
    assert backend.count("trips") == 3


# -- faults ------------------------------------------------------------------------


def test_the_server_runs_unprivileged(server: PostgresServer) -> None:
    pid = server.pid
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    real_uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert real_uid != 0
    if os.geteuid() != 0:
        assert real_uid == os.geteuid()
    assert oct(server.data_dir.stat().st_mode & 0o777) == oct(0o700)
    assert server.data_dir.stat().st_uid == real_uid


def test_a_store_without_a_server_is_unavailable_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        PostgresTripStore(f"host=127.0.0.1 port={free_port()} user=tripmesh dbname=x", timeout=1)
    assert time.monotonic() - started < 10


def test_a_closed_store_is_unavailable_and_close_works_inside_a_running_loop(dsn: str) -> None:
    store = PostgresTripStore(dsn)

    async def go():
        trip, _ = await store.create(request())
        store.close()  # as the coordinator's server does, from its own running loop
        store.close()  # twice is harmless
        with pytest.raises(StorageUnavailable, match="closed"):
            await store.get(trip.trip_id)

    run(go())
    assert not any(t.name == "postgres:trips" and t.is_alive() for t in threading.enumerate())


def test_open_and_aclose_leave_the_callers_loop_free(dsn: str) -> None:
    async def go():
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticking = asyncio.create_task(tick())  # first runs when this task next waits
        store = await PostgresTripStore.open(dsn)
        while_opening = ticks
        trip, _ = await store.create(request())
        before_closing = ticks
        await store.aclose()
        while_closing = ticks - before_closing
        ticking.cancel()
        with pytest.raises(StorageUnavailable):
            await store.get(trip.trip_id)
        return while_opening, while_closing

    # Other work ran on the loop while the store opened and while it closed.
    while_opening, while_closing = run(go())
    assert while_opening > 0 and while_closing > 0


def test_a_killed_server_makes_calls_unavailable_and_loses_nothing_acknowledged() -> None:
    """Trips are created and written by eight writers while the server is SIGKILLed. Calls
    fail with StorageUnavailable while it is down; once it is restarted the same store
    works again, and every trip and write acknowledged before the kill is there."""
    with postgres_server() as killed:
        dsn = fresh_database(killed)
        store = PostgresTripStore(dsn, max_size=8, timeout=2.0)
        # trip id -> the updated_at it may have: its acknowledged one, or, for the write
        # the crash interrupted, either that or the interrupted write's (its commit may
        # have happened before the connection was lost).
        possible: dict[str, set[float]] = {}
        failures: list[BaseException] = []
        try:

            async def writer(n: int, enough: asyncio.Event) -> None:
                for i in range(10_000):
                    trip_id = None
                    try:
                        trip, _ = await store.create(request(key=f"w{n}-{i}"))
                        trip_id = trip.trip_id
                        possible[trip_id] = {trip.updated_at}
                        now = time.time()
                        change = Change((TripEvent("step"),), decision=Decision.ABORT)
                        await store.write(trip_id, change, now)
                        possible[trip_id] = {now}
                    except StorageUnavailable as exc:
                        failures.append(exc)
                        if trip_id is not None:
                            possible[trip_id].add(now)
                        return
                    if len(possible) >= 40:
                        enough.set()

            async def crash() -> None:
                enough = asyncio.Event()
                writers = [asyncio.create_task(writer(n, enough)) for n in range(8)]
                await enough.wait()
                await asyncio.to_thread(killed.kill)
                await asyncio.gather(*writers)
                with pytest.raises(StorageUnavailable):
                    await store.get("trip-any")

            run(crash())
            assert len(failures) == 8  # each writer saw the crash as UNAVAILABLE
            assert killed.port is not None
            killed.start(killed.port)

            async def after() -> tuple[list[Any], int]:
                # A caller retries UNAVAILABLE: the pool reconnects within its back-off.
                deadline, retries = time.monotonic() + 30, 0
                while True:
                    try:
                        await store.counts()
                        break
                    except StorageUnavailable:
                        retries += 1
                        assert time.monotonic() < deadline, "the store did not come back"
                return [await store.get(trip_id) for trip_id in possible], retries

            stored, _ = run(after())
            fresh, replayed = run(store.create(request(key="after the crash")))
        finally:
            store.close()
    assert len(possible) >= 40
    assert all(trip is not None for trip in stored)
    assert all(t.updated_at in possible[t.trip_id] for t in stored)
    assert sum(len(p) == 1 for p in possible.values()) >= 40 - 8  # mostly certain outcomes
    assert not replayed and fresh.status is TripStatus.PENDING


def test_a_store_whose_thread_dies_fails_every_call_and_says_so(dsn: str) -> None:
    """The store's thread is stopped by an exception (injected on its loop, as a stray
    SystemExit would be): on_failure is told, and calls fail at once, never hang."""
    store = PostgresTripStore(dsn)
    told: list[BaseException] = []
    store.on_failure(told.append)

    def die() -> None:
        raise SystemExit("injected")

    try:
        trip, _ = run(store.create(request()))
        store.db.loop.call_soon_threadsafe(die)
        store.db._thread.join(timeout=10)
        assert not store.db._thread.is_alive()
        with pytest.raises(StorageUnavailable, match="thread stopped"):
            run(store.get(trip.trip_id))
        late: list[BaseException] = []
        store.on_failure(late.append)  # after the fact: told at once
    finally:
        store.close()
    assert [type(cause) for cause in told] == [SystemExit]
    assert [type(cause) for cause in late] == [SystemExit]


async def _marks_table(conn: Any) -> None:
    await conn.execute("CREATE TABLE IF NOT EXISTS marks (n INTEGER NOT NULL)")


async def _backend(conn: Any) -> int:
    cur = await conn.execute("SELECT pg_backend_pid()")
    row = await cur.fetchone()
    return int(row[0])


def test_a_read_refused_for_its_transactions_state_runs_again_on_another_connection(
    dsn: str,
) -> None:
    """A chaos run once saw a snapshot read's SET TRANSACTION refused (the server said its
    transaction had already run a query) and answered INTERNAL. Such a refusal (class 25)
    is the connection's fault: it is closed, and the read runs again on a new one."""
    db = PostgresDatabase(dsn, _marks_table, what="test database", min_size=1, max_size=1)
    seen: list[int] = []

    async def read(conn: Any) -> int:
        seen.append(await _backend(conn))
        if len(seen) == 1:  # the first time only: a statement its transaction refuses
            await conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        cur = await conn.execute("SELECT count(*) FROM marks")
        row = await cur.fetchone()
        return int(row[0])

    try:
        assert run(db.call(read, "snapshot")) == 0
        after = run(db.call(_backend, "statement"))
    finally:
        db.close()
    first, second = seen
    assert first != second  # the read ran again, on another connection
    assert after == second  # and the refused one serves nobody again


def test_a_write_refused_for_its_transactions_state_is_unavailable_and_leaves_nothing(
    dsn: str,
) -> None:
    db = PostgresDatabase(dsn, _marks_table, what="test database", min_size=1, max_size=1)
    seen: list[int] = []

    async def write(conn: Any) -> None:
        seen.append(await _backend(conn))
        await conn.execute("INSERT INTO marks VALUES (1)")
        await conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")

    try:
        with pytest.raises(StorageUnavailable, match="nothing was written"):
            run(db.call(write, "write"))
        after = run(db.call(_backend, "statement"))
    finally:
        db.close()
    assert seen[0] != after and len(seen) == 1  # not run again; its connection replaced
    assert _postgres_execute(dsn)("SELECT count(*) FROM marks") == [(0,)]


def test_the_servers_warnings_reach_the_log(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """A warning is all PostgreSQL says of some confusions (a COMMIT with no transaction, a
    BEGIN inside one): the database logs it, naming itself and the SQLSTATE."""
    db = PostgresDatabase(dsn, _marks_table, what="test database", min_size=1, max_size=1)

    async def stray_commit(conn: Any) -> None:
        await conn.execute("COMMIT")

    try:
        with caplog.at_level(logging.WARNING, logger="tripmesh.runtime.pgdatabase"):
            run(db.call(stray_commit, "statement"))
            run(db.call(_backend, "statement"))  # a notice-free call logs nothing
    finally:
        db.close()
    said = [r.getMessage() for r in caplog.records if r.name == "tripmesh.runtime.pgdatabase"]
    assert said == [
        "test database: PostgreSQL says WARNING 25P01: there is no transaction in progress"
    ]


def test_a_write_whose_caller_gave_up_still_runs_to_its_end(dsn: str) -> None:
    """An RPC cancelled (its deadline passed) cancels its wait, not its transaction: the
    write commits whole, as a SQLite job on its thread does."""
    db = PostgresDatabase(dsn, _marks_table, what="test database", min_size=1, max_size=2)

    async def slow_write(conn: Any) -> None:
        await conn.execute("INSERT INTO marks VALUES (1)")
        await conn.execute("SELECT pg_sleep(0.3)")
        await conn.execute("INSERT INTO marks VALUES (2)")

    async def give_up() -> None:
        call = asyncio.ensure_future(db.call(slow_write, "write"))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    count = _postgres_execute(dsn)
    try:
        run(give_up())
        deadline = time.monotonic() + 10
        while count("SELECT count(*) FROM marks") != [(2,)]:
            assert time.monotonic() < deadline, count("SELECT count(*) FROM marks")
            time.sleep(0.05)
    finally:
        db.close()


def test_callers_cancelled_mid_call_leave_no_connection_in_a_bad_state(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What the chaos lab's audit met: callers cancelled in the middle of their calls (a
    killed coordinator's RPCs) left a connection in psycopg's pipeline mode; the next read
    on it was never synced and the snapshot read after it was refused (class 25). Eight
    callers here mix writes, reads and snapshots, half of them cancelled at random."""
    db = PostgresDatabase(dsn, _marks_table, what="test database", min_size=2, max_size=4)
    rng = random.Random(7)

    async def write(conn: Any) -> None:
        await conn.execute("INSERT INTO marks VALUES (1)")
        await conn.execute("SELECT pg_sleep(%s)", (rng.random() * 0.002,))
        await conn.execute("DELETE FROM marks WHERE n = 1")

    async def read(conn: Any) -> int:
        cur = await conn.execute(
            "SELECT count(*), pg_sleep(%s) FROM marks", (rng.random() * 0.002,)
        )
        row = await cur.fetchone()
        return int(row[0])

    async def caller() -> None:
        for _ in range(120):
            calls: list[tuple[Any, How]] = [
                (write, "write"),
                (read, "statement"),
                (read, "snapshot"),
            ]
            job, how = rng.choice(calls)
            call = asyncio.ensure_future(db.call(job, how))
            if rng.random() < 0.5:
                await asyncio.sleep(rng.random() * 0.004)
                call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call

    async def callers() -> None:
        await asyncio.gather(*(caller() for _ in range(8)))

    try:
        with caplog.at_level(logging.WARNING):
            run(callers())
    finally:
        db.close()
    troubles = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert troubles == []
    assert _postgres_execute(dsn)("SELECT count(*) FROM marks") == [(0,)]  # each write whole
