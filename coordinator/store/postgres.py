"""The trip store in PostgreSQL: one trip log that several coordinators can share.

The same tables and the same meaning as `SqliteTripStore`; the SQL is written
once, here, for this backend.

- **Its own event loop.** The connection pool (psycopg 3's `AsyncConnectionPool`)
  lives on an event loop on a thread of the store's own, as SQLite's writer
  lives on its thread: callers on any loop await a call without blocking it,
  and `close()` (the port's is synchronous, and the server calls it from its
  running loop) can finish the work in flight and close the pool by simply
  waiting, as `SqliteTripStore.close` joins its writer. `aclose()` does the
  same from a coroutine without holding up the caller's loop.
- **One transaction per call.** Writes run in READ COMMITTED; a read of more
  than one statement runs in one REPEATABLE READ, READ ONLY transaction (one
  snapshot, as SQLite's readers have); a read of one statement is atomic on its
  own. Readers never wait for writers (MVCC).
- **One trip per key.** The key is inserted first, `ON CONFLICT DO NOTHING`: of
  concurrent creators of one key (two tasks, or two coordinators) exactly one
  inserts it; the others wait for its transaction and then read the winner.
- **Writes of one trip apply in the order they were issued** (the journal
  relies on it: 2PC's phase 2 writes legs in parallel). The pool would run them
  on separate connections, so a trip's writes take turns in this store (across
  coordinators, a trip has one driver at a time).
- **Faults.** A connection or server failure (`psycopg.OperationalError`, a
  pool timeout) raises `StorageUnavailable` (UNAVAILABLE): the transaction was
  rolled back. One case differs, and its message says so: the connection lost
  while COMMIT was in flight, when the outcome is unknown (a property of every
  client-server database; SQLite in-process has no such window).
  Constraint violations and SQL errors stay what they are (bugs). If the
  store's own thread dies, every call fails at once and `on_failure` is told.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from coordinator.domain import (
    LEG_ORDER,
    Attention,
    CoordinatorError,
    Decision,
    Leg,
    LegStatus,
    Protocol,
    Trip,
    TripEvent,
    TripRequest,
    TripStatus,
    reservation_id,
)
from coordinator.journal import Change
from coordinator.store import (
    LeaseLost,
    Told,
    TripQuery,
    TripStore,
    page_filter,
    trip_from_rows,
)
from tripmesh.runtime import failpoints, outbox
from tripmesh.runtime.database import StorageUnavailable, sql_values
from tripmesh.runtime.errors import ErrorKind
from tripmesh.runtime.fields import quote
from tripmesh.runtime.outbox import Outbox

T = TypeVar("T")
log = logging.getLogger(__name__)
Conn = AsyncConnection[Any]
Job = Callable[[Conn], Awaitable[T]]
# write: READ COMMITTED; snapshot: several reads, one snapshot; statement: one read, on its
# own (writes never run so: a connection lost during one would leave its outcome unknown).
How = Literal["write", "snapshot", "statement"]

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS trips (
  seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
  trip_id TEXT PRIMARY KEY,
  protocol TEXT NOT NULL CHECK (protocol IN ({sql_values(Protocol)})),
  status TEXT NOT NULL CHECK (status IN ({sql_values(TripStatus)})),
  decision TEXT CHECK (decision IN ({sql_values(Decision)})),
  request JSONB NOT NULL,
  failure_reason TEXT NOT NULL DEFAULT '',
  attention TEXT CHECK (attention IN ({sql_values(Attention)})),
  attention_detail TEXT NOT NULL DEFAULT '',
  created_at DOUBLE PRECISION NOT NULL,
  updated_at DOUBLE PRECISION NOT NULL,
  -- The lease: which coordinator drives the trip, until when (the server's clock), and
  -- the fencing number every write of it checks (raised at each takeover).
  owner TEXT NOT NULL DEFAULT '',
  lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
  fence BIGINT NOT NULL DEFAULT 0,
  CHECK ((status = 'needs_attention') = (attention IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS trips_by_status ON trips(status, seq);
CREATE INDEX IF NOT EXISTS trips_by_protocol ON trips(protocol, seq);
CREATE TABLE IF NOT EXISTS legs (
  trip_id TEXT NOT NULL REFERENCES trips(trip_id),
  kind TEXT NOT NULL,
  reservation_id TEXT NOT NULL UNIQUE,
  status TEXT NOT NULL,
  price_cents BIGINT NOT NULL DEFAULT 0,
  reason TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (trip_id, kind)
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
  key TEXT PRIMARY KEY,
  trip_id TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_keys_by_age ON idempotency_keys(created_at);
CREATE TABLE IF NOT EXISTS events (
  seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  trip_id TEXT NOT NULL,
  at DOUBLE PRECISION NOT NULL,
  kind TEXT NOT NULL,
  leg TEXT NOT NULL DEFAULT '',
  detail TEXT NOT NULL DEFAULT '',
  actor TEXT NOT NULL DEFAULT 'coordinator'
);
CREATE INDEX IF NOT EXISTS events_by_trip ON events(trip_id, seq);
CREATE TABLE IF NOT EXISTS outbox (
  seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  event_id TEXT NOT NULL UNIQUE,
  subject TEXT NOT NULL,
  payload BYTEA NOT NULL,
  created_at DOUBLE PRECISION NOT NULL,
  published_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox(seq) WHERE published_at IS NULL;
CREATE TABLE IF NOT EXISTS tripmesh_schema (
  what TEXT PRIMARY KEY,
  version INTEGER NOT NULL
)"""
# This backend's own schema version (SQLite's counts separately): bumped whenever
# SCHEMA changes; a database written by another version is refused, not misread.
SCHEMA_VERSION = 1
_WHAT = "trip store"
# Serialises schema creation between coordinators starting at once (an arbitrary number).
_SCHEMA_LOCK = 0x7472_6970
# What the server or the way to it reports when it cannot do a call: the connection is lost,
# the server shuts down, is full, out of resources or in recovery, no connection came in
# time (the pool's errors are OperationalErrors too), a deadlock; and a standby's refusal
# to write (after a failover). Constraint violations and SQL errors are not among them.
_UNAVAILABLE = (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction)
_STILL_DRIVEN = [a.value for a in Attention if a.still_driven]
LOST = -1  # the fence of a lease taken over (see PostgresTripStore._held)
# Leases are timed by the server's clock, the one clock every coordinator shares.
_NOW = "extract(epoch from clock_timestamp())"
_UNFINISHED = "(status = 'pending' OR (status = 'needs_attention' AND attention = ANY(%s)))"
# A trip another coordinator may take (its owner's parameter): ours, never held, or lapsed.
_FREE_OR_OURS = f"(owner = %s OR owner = '' OR lease_until < {_NOW})"
_TRIP = (
    "seq, trip_id, status, decision, request::text AS request, failure_reason,"
    " attention, attention_detail, created_at, updated_at"
)


class PostgresTripStore(TripStore):
    """The trip log on a PostgreSQL server at `dsn` (a libpq connection string).

    Construction connects, creates or checks the schema and fills the pool, blocking
    (as `SqliteTripStore`'s does); `await PostgresTripStore.open(...)` does it off the
    caller's loop. `timeout`: how long a call waits for a connection before it fails
    with `StorageUnavailable`. `reconnect_timeout`: how long the pool keeps retrying one
    lost connection; its back-off doubles each time (1, 2, 4 ... s) until then, so this
    also bounds how long the store may lag behind a server that came back.
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        timeout: float = 5.0,
        reconnect_timeout: float = 10.0,
        replica: str = "",
        lease: float = 5.0,
    ) -> None:
        #: This coordinator, as the leases name it; `lease`: seconds a lease lasts unrenewed
        #: (renewed every third of it while held): how long a dead coordinator's trips wait.
        self.replica = replica or f"coordinator-{uuid.uuid4().hex[:12]}"
        self.lease = lease
        # On the store's loop only: the trips whose lease we hold, and their fencing numbers;
        # LOST for one taken over while its driver here still runs: that driver may never
        # write it again (until it stops and `release_lease`s it).
        self._held: dict[str, int] = {}
        self._callbacks: list[Callable[[BaseException], None]] = []
        # Set if the store's thread died: what every call then raises, and why.
        self._dead: StorageUnavailable | None = None
        self._death_cause: BaseException | None = None
        self._waiting: set[Future[Any]] = set()  # calls not yet answered
        # Touched on the store's loop only: each trip's writes in turn, and the calls under way.
        self._turns: dict[str, _Turn] = {}
        self._calls: set[asyncio.Task[Any]] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="postgres:trips", daemon=True)
        self._thread.start()
        try:
            self._pool = self._blocking(
                self._open(dsn, min_size, max_size, timeout, reconnect_timeout)
            )
        except BaseException:
            self._stop_loop()
            raise
        self._outbox = PostgresOutbox(self)
        self._renewing = asyncio.run_coroutine_threadsafe(self._renew_forever(), self._loop)

    @classmethod
    async def open(cls, dsn: str, **options: Any) -> PostgresTripStore:
        """A store (the constructor's `options`), opened without blocking the caller's loop."""
        return await asyncio.to_thread(functools.partial(cls, dsn, **options))

    async def _open(
        self, dsn: str, min_size: int, max_size: int, timeout: float, reconnect_timeout: float
    ) -> AsyncConnectionPool[Any]:
        pool: AsyncConnectionPool[Any] | None = None
        try:
            # The schema first, on a connection of its own: its error says what went wrong,
            # where a pool's says only that it could not fill up.
            conn = await AsyncConnection.connect(
                dsn, autocommit=True, connect_timeout=max(1, round(timeout))
            )
            async with conn:
                await _migrate(conn)
            pool = AsyncConnectionPool(
                dsn,
                kwargs={"autocommit": True},  # transactions are explicit: conn.transaction()
                min_size=min_size,
                max_size=max_size,
                open=False,
                # A connection broken by a server restart is replaced before it is used,
                # at the price of one round trip per call.
                check=AsyncConnectionPool.check_connection,
                timeout=timeout,
                reconnect_timeout=reconnect_timeout,
                name="trips",
            )
            await pool.open(wait=True, timeout=timeout)
        except BaseException as exc:
            if pool is not None:
                await pool.close()
            if isinstance(exc, _UNAVAILABLE):
                raise _unavailable(exc, committing=False) from exc
            raise
        return pool

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """`callback(cause)` runs if the store's own thread dies (its event loop stopped by
        an exception: SystemExit or KeyboardInterrupt raised on it), as SQLite's do when
        its writer dies; at once if it has. Then no call can ever be answered: the
        process must restart. A server that is down is not such a failure: calls fail
        with StorageUnavailable meanwhile, and the pool reconnects when it is back
        (a restarted coordinator would find the server no sooner)."""
        self._callbacks.append(callback)
        if self._death_cause is not None:
            callback(self._death_cause)

    def _serve(self) -> None:
        try:
            self._loop.run_forever()
        except BaseException as cause:  # noqa: BLE001 - any death of the thread must be loud
            self._die(cause)

    def _die(self, cause: BaseException) -> None:
        log.critical("the trip store's thread died (%r): failing every call", cause)
        dead = StorageUnavailable(
            f"storage unavailable: the trip store's thread stopped ({cause!r});"
            " this server is restarting, retry the call"
        )
        with self._lock:
            self._dead, self._death_cause = dead, cause
            stranded = list(self._waiting)
        for callback in self._callbacks:
            try:
                callback(cause)
            except Exception:
                log.exception("store-failure callback failed")
        for future in stranded:
            with contextlib.suppress(InvalidStateError):
                future.set_exception(dead)

    def close(self) -> None:
        """Let the calls in flight finish, close the pool, stop the store's thread; later
        calls fail with StorageUnavailable. Blocks, like `SqliteTripStore.close`."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("close() was called on the store's own thread")
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._dead is None:
                asyncio.run_coroutine_threadsafe(self._finish(), self._loop).result()
            else:  # its thread is gone; the loop can still run, on a thread of its own
                last = threading.Thread(
                    target=self._loop.run_until_complete, args=(self._finish(),)
                )
                last.start()
                last.join()
        finally:
            self._stop_loop()

    async def aclose(self) -> None:
        """`close()`, awaited without blocking the caller's event loop."""
        await asyncio.to_thread(self.close)

    async def _finish(self) -> None:
        self._renewing.cancel()
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=self._pool.timeout)
        await self._pool.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    # -- running calls on the store's loop ---------------------------------------
    def _submit(self, work: Coroutine[Any, Any, T]) -> Future[T]:
        with self._lock:
            if self._closed or self._dead is not None:
                work.close()
                raise self._dead or StorageUnavailable(
                    "storage unavailable: the trip store is closed"
                )
            future = asyncio.run_coroutine_threadsafe(work, self._loop)
            self._waiting.add(future)
        future.add_done_callback(self._answered)
        return future

    def _answered(self, future: Future[Any]) -> None:
        with self._lock:
            self._waiting.discard(future)

    def _blocking(self, work: Coroutine[Any, Any, T]) -> T:
        return self._submit(work).result()

    async def _call(self, job: Job[T], how: How, *, trip_id: str | None = None) -> T:
        return await asyncio.wrap_future(self._submit(self._transaction(job, how, trip_id)))

    async def _transaction(self, job: Job[T], how: How, trip_id: str | None) -> T:
        call = asyncio.current_task()
        assert call is not None
        self._calls.add(call)
        try:
            return await self._run(job, how, trip_id)
        finally:
            self._calls.discard(call)

    async def _run(self, job: Job[T], how: How, trip_id: str | None) -> T:
        async with self._turn(trip_id):
            committing = False
            try:
                async with self._pool.connection() as conn:
                    if how == "statement":
                        return await job(conn)  # autocommit: the statement is its transaction
                    async with conn.transaction():
                        if how == "snapshot":
                            await conn.execute(
                                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
                            )
                        result = await job(conn)
                        committing = True  # what raises from here on is the COMMIT
                    return result
            except _UNAVAILABLE as exc:
                raise _unavailable(exc, committing=committing) from exc

    @contextlib.asynccontextmanager
    async def _turn(self, trip_id: str | None) -> AsyncIterator[None]:
        """Writes of one trip, one at a time, in the order they reached this loop (an asyncio
        lock queues its waiters in order; a task's first step runs in order of submission)."""
        if trip_id is None:
            yield
            return
        turn = self._turns.setdefault(trip_id, _Turn())
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[trip_id]

    # -- writes ------------------------------------------------------------------
    async def create(self, request: TripRequest) -> tuple[Trip, bool]:
        """A new trip is created holding its lease (fence 1): its creator drives it."""
        fingerprint, body = request.fingerprint(), request.to_json()

        async def job(conn: Conn) -> tuple[Trip, bool]:
            trip, replayed = await _create(conn, request, fingerprint, body, self._lease_of())
            if not replayed:
                self._held[trip.trip_id] = 1
            return trip, replayed

        return await self._call(job, "write")

    async def write(
        self, trip_id: str, change: Change, now: float, *, tell: Sequence[Told] = ()
    ) -> None:
        """Fenced: a trip we hold is written only while our fencing number is still its
        own (LeaseLost if it was taken over); one we do not hold only if no other
        coordinator holds it, and the write raises its fence (a stale holder is then out)."""

        async def job(conn: Conn) -> None:
            fence = self._held.get(trip_id)
            written = None
            if fence != LOST:
                written = await _write(conn, trip_id, change, now, self._lease_of(), fence)
            if written is None:
                if fence is not None:
                    self._held[trip_id] = LOST
                raise LeaseLost(
                    trip_id,
                    "another coordinator holds its lease (this one's was taken over):"
                    " it drives the trip now",
                )
            if fence is not None:
                self._held[trip_id] = written
            for event, subject in tell:
                await conn.execute(
                    "INSERT INTO outbox (event_id, subject, payload, created_at)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING",
                    (event.event_id, subject, event.SerializeToString(), time.time()),
                )

        await self._call(job, "write", trip_id=trip_id)

    async def purge_keys(self, older_than: float) -> int:
        cutoff = time.time() - older_than

        async def job(conn: Conn) -> int:
            cur = await conn.execute(
                "DELETE FROM idempotency_keys WHERE created_at < %s", (cutoff,)
            )
            return cur.rowcount

        return await self._call(job, "write")

    # -- leases ----------------------------------------------------------------------
    def _lease_of(self) -> _Lease:
        return _Lease(self.replica, self.lease)

    async def claim_unfinished(self) -> list[str]:
        async def job(conn: Conn) -> list[str]:
            claimed = await _claim(conn, self._lease_of(), exclude=list(self._held))
            self._held.update(claimed)
            return list(claimed)

        claimed = await self._call(job, "write")
        if claimed:
            log.info("%s holds the lease of %d unfinished trips", self.replica, len(claimed))
        return claimed

    async def hold_lease(self, trip_id: str) -> bool:
        async def job(conn: Conn) -> bool:
            if trip_id in self._held:
                return self._held[trip_id] != LOST
            claimed = await _claim(conn, self._lease_of(), trip_id=trip_id)
            self._held.update(claimed)
            return trip_id in claimed

        return await self._call(job, "write", trip_id=trip_id)

    def release_lease(self, trip_id: str) -> None:
        with contextlib.suppress(RuntimeError):  # the store's loop is closed: nothing held
            self._loop.call_soon_threadsafe(self._held.pop, trip_id, None)

    async def _renew_forever(self) -> None:
        """Renew every lease we hold, each third of a lease; drop those taken over."""
        while True:
            await asyncio.sleep(self.lease / 3)
            held = {t: f for t, f in self._held.items() if f != LOST}
            if not held:
                continue
            try:
                renew = functools.partial(_renew, lease=self._lease_of(), held=held)
                renewed = await self._transaction(renew, "write", None)
            except StorageUnavailable as exc:
                log.warning("leases not renewed: %s", exc)
                continue
            except Exception:
                log.exception("leases not renewed")
                continue
            for trip_id, fence in held.items():
                if trip_id not in renewed and self._held.get(trip_id) == fence:
                    log.warning("lease of %s lost to another coordinator", trip_id)
                    self._held[trip_id] = LOST

    @property
    def outbox(self) -> PostgresOutbox:
        return self._outbox

    # -- reads -------------------------------------------------------------------
    async def get(self, trip_id: str) -> Trip | None:
        return await self._call(lambda c: _get(c, trip_id), "snapshot")

    async def events(self, trip_id: str) -> list[TripEvent]:
        async def job(conn: Conn) -> list[TripEvent]:
            rows = await _rows(
                conn,
                "SELECT kind, leg, detail, actor, at FROM events WHERE trip_id = %s ORDER BY seq",
                (trip_id,),
            )
            return [TripEvent(r["kind"], r["leg"], r["detail"], r["actor"], r["at"]) for r in rows]

        return await self._call(job, "statement")

    async def decision(self, trip_id: str) -> tuple[bool, Decision | None]:
        async def job(conn: Conn) -> tuple[bool, Decision | None]:
            cur = await conn.execute("SELECT decision FROM trips WHERE trip_id = %s", (trip_id,))
            row = await cur.fetchone()
            if row is None:
                return False, None
            return True, Decision(row[0]) if row[0] else None

        return await self._call(job, "statement")

    async def list_trips(
        self, query: TripQuery, *, before: int, limit: int
    ) -> tuple[list[Trip], int | None]:
        return await self._call(lambda c: _page(c, query, before, limit), "snapshot")

    async def unfinished(self) -> list[str]:
        async def job(conn: Conn) -> list[str]:
            cur = await conn.execute(
                f"SELECT trip_id FROM trips WHERE {_UNFINISHED} ORDER BY seq", (_STILL_DRIVEN,)
            )
            return [str(r[0]) for r in await cur.fetchall()]

        return await self._call(job, "statement")

    async def counts(self) -> dict[TripStatus, int]:
        async def job(conn: Conn) -> dict[TripStatus, int]:
            cur = await conn.execute("SELECT status, count(*) FROM trips GROUP BY status")
            return {TripStatus(s): int(n) for s, n in await cur.fetchall()}

        return await self._call(job, "statement")

    async def in_doubt(self) -> int:
        async def job(conn: Conn) -> int:
            cur = await conn.execute(
                "SELECT count(*) FROM trips WHERE protocol IN (%s, %s) AND decision IS NOT NULL"
                " AND status IN ('pending', 'needs_attention')",
                (Protocol.TWO_PHASE_COMMIT.value, Protocol.THREE_PHASE_COMMIT.value),
            )
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        return await self._call(job, "statement")


@dataclass(frozen=True)
class _Lease:
    owner: str  # the coordinator (its replica name)
    seconds: float


class _Turn:
    """Whose turn it is to write one trip, and how many writes want it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


def _unavailable(exc: psycopg.Error, *, committing: bool) -> StorageUnavailable:
    """What a failure of the connection or server means to the caller."""
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if committing:
        return StorageUnavailable(
            f"storage unavailable (PostgreSQL: {why}) while committing: the call may or may"
            " not have been written; read it back or retry it"
        )
    return StorageUnavailable(
        f"storage unavailable (PostgreSQL: {why}); nothing was written, retry the call"
    )


async def _migrate(conn: Conn) -> None:
    """Create the schema in a new database, or check an old one is of SCHEMA_VERSION."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        cur = await conn.execute(
            "SELECT to_regclass('trips') IS NOT NULL, to_regclass('tripmesh_schema') IS NOT NULL"
        )
        row = await cur.fetchone()
        assert row is not None
        has_trips, has_versions = row
        found = None
        if has_versions:
            cur = await conn.execute(
                "SELECT version FROM tripmesh_schema WHERE what = %s", (_WHAT,)
            )
            version = await cur.fetchone()
            found = version[0] if version is not None else None
        if has_trips and found != SCHEMA_VERSION:
            raise RuntimeError(
                f"the trip store was written by another version of tripmesh (schema {found},"
                f" this one reads {SCHEMA_VERSION}); start on an empty database"
            )
        for statement in filter(str.strip, SCHEMA.split(";")):
            await conn.execute(statement)
        await conn.execute(
            "INSERT INTO tripmesh_schema (what, version) VALUES (%s, %s)"
            " ON CONFLICT (what) DO UPDATE SET version = EXCLUDED.version",
            (_WHAT, SCHEMA_VERSION),
        )


async def _rows(conn: Conn, sql: str, args: Sequence[object] = ()) -> list[DictRow]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(sql, args)
    return await cur.fetchall()


async def _create(
    conn: Conn, request: TripRequest, fingerprint: str, body: str, lease: _Lease
) -> tuple[Trip, bool]:
    failpoints.hit("coordinator.create_trip")
    trip_id = "trip-" + uuid.uuid4().hex[:20]
    now = time.time()
    key = request.idempotency_key
    for _ in range(3):  # a key purged between our two statements: try again
        cur = await conn.execute(
            "INSERT INTO idempotency_keys (key, trip_id, fingerprint, created_at)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (key) DO NOTHING RETURNING trip_id",
            (key, trip_id, fingerprint, now),
        )
        if await cur.fetchone() is not None:
            break  # ours: the trip is created below
        # Taken: DO NOTHING waited for its transaction to commit, and in READ COMMITTED
        # this next statement sees it.
        cur = await conn.execute(
            "SELECT trip_id, fingerprint FROM idempotency_keys WHERE key = %s", (key,)
        )
        row = await cur.fetchone()
        if row is None:
            continue
        first_trip, first_fingerprint = row
        if first_fingerprint != fingerprint:
            raise CoordinatorError(
                f"idempotency_key {quote(key)} was already used for trip"
                f" {first_trip} with different parameters",
                kind=ErrorKind.CONFLICT,
            )
        trip = await _get(conn, first_trip)
        assert trip is not None  # the key and its trip are written in one transaction
        return trip, True
    else:
        raise StorageUnavailable(f"storage unavailable: idempotency_key {quote(key)} kept moving")
    await conn.execute(
        "INSERT INTO trips (trip_id, protocol, status, request, created_at, updated_at,"
        f" owner, fence, lease_until) VALUES (%s, %s, 'pending', %s, %s, %s, %s, 1, {_NOW} + %s)",
        (trip_id, request.protocol.value, body, now, now, lease.owner, lease.seconds),
    )
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO legs (trip_id, kind, reservation_id, status) VALUES (%s, %s, %s, %s)",
            [
                (trip_id, kind.value, reservation_id(trip_id, kind), LegStatus.NOT_STARTED.value)
                for kind in LEG_ORDER
            ],
        )
    await _add_events(conn, trip_id, (TripEvent("created", detail=request.protocol.value, at=now),))
    legs = tuple(
        Leg(kind, reservation_id(trip_id, kind), LegStatus.NOT_STARTED, 0, "") for kind in LEG_ORDER
    )
    return Trip(trip_id, request, TripStatus.PENDING, None, legs, "", now, now), False


async def _add_events(conn: Conn, trip_id: str, events: Iterable[TripEvent]) -> None:
    rows = [(trip_id, e.at, e.kind, e.leg, e.detail, e.actor) for e in events]
    if rows:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO events (trip_id, at, kind, leg, detail, actor)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                rows,
            )


async def _write(
    conn: Conn, trip_id: str, change: Change, now: float, lease: _Lease, fence: int | None
) -> int | None:
    """Apply `change` if the lease allows (see `PostgresTripStore.write`): the trip's fence
    after it, or None (nothing written) when another coordinator holds the trip."""
    sets: list[str] = ["updated_at = %s"]
    args: list[object] = [now]
    if change.status is not None:
        sets.append("status = %s, attention = %s, attention_detail = %s")
        attention = change.attention.value if change.attention is not None else None
        args += [change.status.value, attention, change.attention_detail]
    if change.decision is not None:
        sets.append("decision = %s")
        args.append(change.decision.value)
    if change.failure_reason is not None:
        sets.append("failure_reason = %s")
        args.append(change.failure_reason)
    if fence is not None:  # ours: written while our fence stands, and the lease renewed
        sets.append(f"lease_until = {_NOW} + %s")
        where = "trip_id = %s AND owner = %s AND fence = %s"
        args += [lease.seconds, trip_id, lease.owner, fence]
    else:  # not held: written unless another holds it, fencing out any stale holder
        sets.append("owner = %s, fence = fence + 1")
        where = f"trip_id = %s AND {_FREE_OR_OURS}"
        args += [lease.owner, trip_id, lease.owner]
    cur = await conn.execute(
        f"UPDATE trips SET {', '.join(sets)} WHERE {where} RETURNING fence", args
    )
    row = await cur.fetchone()
    if row is None:
        return None  # held by another (or no such trip): nothing of this change written
    if change.legs:
        async with conn.cursor() as cur:
            await cur.executemany(
                "UPDATE legs SET status = %s, reason = %s,"
                " price_cents = coalesce(%s, price_cents) WHERE trip_id = %s AND kind = %s",
                [
                    (u.status.value, u.reason, u.price_cents, trip_id, kind.value)
                    for kind, u in change.legs.items()
                ],
            )
    await _add_events(conn, trip_id, change.events)
    return int(row[0])


async def _claim(
    conn: Conn, lease: _Lease, *, exclude: Sequence[str] = (), trip_id: str | None = None
) -> dict[str, int]:
    """Take the lease of unfinished trips nobody holds (expired, or ours from before a
    restart), or of `trip_id` alone; raise their fences. trip id -> new fence."""
    which = "trip_id = %s" if trip_id is not None else f"{_UNFINISHED} AND NOT trip_id = ANY(%s)"
    args: list[object] = [trip_id] if trip_id is not None else [_STILL_DRIVEN, list(exclude)]
    cur = await conn.execute(
        f"UPDATE trips SET owner = %s, fence = fence + 1, lease_until = {_NOW} + %s"
        " WHERE trip_id IN (SELECT trip_id FROM trips"
        f"  WHERE {which} AND {_FREE_OR_OURS}"
        "  ORDER BY seq FOR UPDATE SKIP LOCKED)"
        " RETURNING trip_id, fence",
        [lease.owner, lease.seconds, *args, lease.owner],
    )
    return {str(t): int(f) for t, f in await cur.fetchall()}


async def _renew(conn: Conn, lease: _Lease, held: dict[str, int]) -> set[str]:
    """Extend the leases we still hold (owner and fence unchanged): the trips renewed."""
    cur = await conn.execute(
        f"UPDATE trips SET lease_until = {_NOW} + %s FROM unnest(%s::text[], %s::bigint[])"
        " AS ours(trip_id, fence) WHERE trips.trip_id = ours.trip_id"
        " AND trips.fence = ours.fence AND trips.owner = %s RETURNING trips.trip_id",
        (lease.seconds, list(held), list(held.values()), lease.owner),
    )
    return {str(r[0]) for r in await cur.fetchall()}


async def _get(conn: Conn, trip_id: str) -> Trip | None:
    rows = await _rows(conn, f"SELECT {_TRIP} FROM trips WHERE trip_id = %s", (trip_id,))
    if not rows:
        return None
    return trip_from_rows(
        rows[0], await _rows(conn, "SELECT * FROM legs WHERE trip_id = %s", (trip_id,))
    )


_CUSTOMER = "(request ->> 'customer_id')"
_KEY = "(request ->> 'idempotency_key')"


async def _page(
    conn: Conn, query: TripQuery, before: int, limit: int
) -> tuple[list[Trip], int | None]:
    """A page of trips in two statements: the trips, then all of their legs."""
    sql = f"SELECT {_TRIP} FROM trips WHERE true"
    where, args = page_filter(query, before, seq="seq", customer=_CUSTOMER, key=_KEY, mark="%s")
    sql += where
    rows = await _rows(conn, sql + " ORDER BY seq DESC LIMIT %s", (*args, limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    legs: dict[str, list[DictRow]] = {r["trip_id"]: [] for r in rows}
    if rows:
        for leg in await _rows(conn, "SELECT * FROM legs WHERE trip_id = ANY(%s)", (list(legs),)):
            legs[leg["trip_id"]].append(leg)
    trips = [trip_from_rows(r, legs[r["trip_id"]]) for r in rows]
    return trips, (int(rows[-1]["seq"]) if more else None)


class PostgresOutbox(Outbox):
    """The trip store's outbox table, as its relay and its metrics see it."""

    def __init__(self, store: PostgresTripStore) -> None:
        self.store = store

    async def pending(self, limit: int = outbox.BATCH) -> list[outbox.Row]:
        return await self.store._call(lambda c: _pending(c, limit), "statement")

    async def mark(self, seqs: Sequence[int]) -> None:
        await self.store._call(lambda c: _mark(c, seqs), "write")

    def depth(self) -> int:
        return self.store._blocking(self.store._transaction(_depth, "statement", None))


async def _pending(conn: Conn, limit: int) -> list[outbox.Row]:
    cur = await conn.execute(
        "SELECT seq, event_id, subject, payload FROM outbox"
        " WHERE published_at IS NULL ORDER BY seq LIMIT %s",
        (limit,),
    )
    return [(int(s), str(e), str(subj), bytes(p)) for s, e, subj, p in await cur.fetchall()]


async def _mark(conn: Conn, seqs: Sequence[int]) -> None:
    await conn.execute(
        "UPDATE outbox SET published_at = %s WHERE seq = ANY(%s)", (time.time(), list(seqs))
    )


async def _depth(conn: Conn) -> int:
    cur = await conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])
