"""The trip store in PostgreSQL: one trip log that several coordinators can share.

The same tables and the same meaning as `SqliteTripStore`; the SQL is written
once, here, for this backend.

How it reaches the server (a pool on a thread of its own, one transaction per
call, faults as StorageUnavailable) is `tripmesh.runtime.pgdatabase`'s.

- **One trip per key.** The key is inserted first, `ON CONFLICT DO NOTHING`: of
  concurrent creators of one key (two tasks, or two coordinators) exactly one
  inserts it; the others wait for its transaction and then read the winner.
- **Writes of one trip apply in the order they were issued** (the journal
  relies on it: 2PC's phase 2 writes legs in parallel): they name the trip as
  their key, and take turns (across coordinators, a trip has one driver at a time).
- **Leases.** A trip is driven by the coordinator that holds its lease (owner,
  expiry by the server's clock, a fencing number every write checks), renewed
  while it works; a dead coordinator's lapse, and a live one takes its trips over.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from psycopg.rows import DictRow

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
from tripmesh.runtime.pgdatabase import Conn, How, Job, PostgresDatabase, migrate
from tripmesh.runtime.pgdatabase import rows as fetch

T = TypeVar("T")
log = logging.getLogger(__name__)

SCHEMA = (
    f"""
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
"""
    + outbox.POSTGRES_SCHEMA
)
# This backend's own schema version (SQLite's counts separately): bumped whenever
# SCHEMA changes; a database written by another version is refused, not misread.
SCHEMA_VERSION = 1
_WHAT = "trip store"
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
        # On the database's loop only: the trips whose lease we hold, and their fencing
        # numbers; LOST for one taken over while its driver here still runs: that driver
        # may never write it again (until it stops and `release_lease`s it).
        self._held: dict[str, int] = {}
        self.db = PostgresDatabase(
            dsn,
            migrate(SCHEMA, SCHEMA_VERSION, what=_WHAT, table="trips"),
            what=_WHAT,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            reconnect_timeout=reconnect_timeout,
        )
        self._outbox = outbox.PostgresOutbox(self.db)
        self._renewing = self.db.spawn(self._renew_forever())

    @classmethod
    async def open(cls, dsn: str, **options: Any) -> PostgresTripStore:
        """A store (the constructor's `options`), opened without blocking the caller's loop."""
        return await asyncio.to_thread(functools.partial(cls, dsn, **options))

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """`callback(cause)` runs if the store's own thread dies (see
        `PostgresDatabase.on_failure`)."""
        self.db.on_failure(callback)

    def close(self) -> None:
        """Let the calls in flight finish, close the pool, stop the store's thread; later
        calls fail with StorageUnavailable. Blocks, like `SqliteTripStore.close`."""
        self.db.close()

    async def aclose(self) -> None:
        await self.db.aclose()

    async def _call(
        self,
        job: Job[T],
        how: How,
        *,
        trip_id: str | None = None,
        committed: Callable[[T], object] | None = None,
    ) -> T:
        return await self.db.call(job, how, key=trip_id, committed=committed)

    # -- writes ------------------------------------------------------------------
    async def create(self, request: TripRequest) -> tuple[Trip, bool]:
        """A new trip is created holding its lease (fence 1): its creator drives it."""
        fingerprint, body = request.fingerprint_and_json()

        async def job(conn: Conn) -> tuple[Trip, bool]:
            return await _create(conn, request, fingerprint, body, self._lease_of())

        def committed(created: tuple[Trip, bool]) -> None:
            # Held only once it exists for sure: a create whose COMMIT was lost in flight
            # (UNAVAILABLE, outcome unknown) may have made the trip, with our lease; then
            # it is not ours to skip, and our own sweep takes it (owner = us) and drives it.
            trip, replayed = created
            if not replayed:
                self._held[trip.trip_id] = 1

        return await self._call(job, "write", committed=committed)

    async def write(
        self, trip_id: str, change: Change, now: float, *, tell: Sequence[Told] = ()
    ) -> None:
        """Fenced: a trip we hold is written only while our fencing number is still its
        own (LeaseLost if it was taken over); one we do not hold only if no other
        coordinator holds it, and the write raises its fence (a stale holder is then out)."""

        async def job(conn: Conn) -> int:
            fence = self._held.get(trip_id)
            written = None
            if fence != LOST:
                written = await _write(conn, trip_id, change, now, self._lease_of(), fence, tell)
            if written is None:  # raised: the transaction, and all it sent, rolls back
                if fence is not None:
                    self._held[trip_id] = LOST
                raise LeaseLost(
                    trip_id,
                    "another coordinator holds its lease (this one's was taken over):"
                    " it drives the trip now",
                )
            return written

        def committed(written: int) -> None:
            if trip_id in self._held:
                self._held[trip_id] = written

        await self._call(job, "write", trip_id=trip_id, committed=committed)

    async def purge_keys(self, older_than: float) -> int:
        cutoff = time.time() - older_than

        async def job(conn: Conn) -> int:
            cur = await conn.execute(
                "WITH gone AS (DELETE FROM idempotency_keys WHERE created_at < %s RETURNING 1)"
                " SELECT count(*) FROM gone",
                (cutoff,),
            )
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        return await self._call(job, "write")

    # -- leases ----------------------------------------------------------------------
    def _lease_of(self) -> _Lease:
        return _Lease(self.replica, self.lease)

    def _hold(self, claimed: dict[str, int]) -> None:
        """Trips whose lease a committed claim gave us, and their fences (the store's loop)."""
        self._held.update(claimed)

    async def claim_unfinished(self) -> list[str]:
        async def job(conn: Conn) -> dict[str, int]:
            return await _claim(conn, self._lease_of(), exclude=list(self._held))

        # Held once the claim committed (a claim rolled back raised no fence: were it kept,
        # our writes would be refused and our sweeps would skip the trip for good).
        held = await self._call(job, "write", committed=self._hold)
        claimed = list(held)
        if claimed:
            log.info("%s holds the lease of %d unfinished trips", self.replica, len(claimed))
        return claimed

    async def hold_lease(self, trip_id: str) -> bool:
        async def job(conn: Conn) -> dict[str, int]:
            if trip_id in self._held:
                return {trip_id: self._held[trip_id]}
            return await _claim(conn, self._lease_of(), trip_id=trip_id)

        held = await self._call(job, "write", trip_id=trip_id, committed=self._hold)
        return held.get(trip_id, LOST) != LOST

    def release_lease(self, trip_id: str) -> None:
        self.db.call_soon(lambda: self._held.pop(trip_id, None))

    async def _renew_forever(self) -> None:
        """Renew every lease we hold, each third of a lease; drop those taken over."""
        while True:
            await asyncio.sleep(self.lease / 3)
            held = {t: f for t, f in self._held.items() if f != LOST}
            if not held:
                continue
            try:
                renew = functools.partial(_renew, lease=self._lease_of(), held=held)
                renewed = await self.db.transaction(renew, "write", None)
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
    def outbox(self) -> outbox.PostgresOutbox:
        return self._outbox

    # -- reads -------------------------------------------------------------------
    async def get(self, trip_id: str) -> Trip | None:
        return await self._call(lambda c: _get(c, trip_id), "snapshot")

    async def events(self, trip_id: str) -> list[TripEvent]:
        async def job(conn: Conn) -> list[TripEvent]:
            rows = await fetch(
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
    conn: Conn,
    trip_id: str,
    change: Change,
    now: float,
    lease: _Lease,
    fence: int | None,
    tell: Sequence[Told],
) -> int | None:
    """Apply `change` and queue `tell` if the lease allows (see `PostgresTripStore.write`):
    the trip's fence after it, or None when another coordinator holds the trip, and then
    the caller must roll back (raise): the legs, events and outbox rows went out with the
    trip's update, pipelined, before its answer came back."""
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
    trip = await conn.execute(
        f"UPDATE trips SET {', '.join(sets)} WHERE {where} RETURNING fence", args
    )
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
    for event, subject in tell:
        await outbox.add_postgres(conn, event, subject)
    row = await trip.fetchone()  # one round trip for all of the above
    return None if row is None else int(row[0])


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
    rows = await fetch(conn, f"SELECT {_TRIP} FROM trips WHERE trip_id = %s", (trip_id,))
    if not rows:
        return None
    return trip_from_rows(
        rows[0], await fetch(conn, "SELECT * FROM legs WHERE trip_id = %s", (trip_id,))
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
    rows = await fetch(conn, sql + " ORDER BY seq DESC LIMIT %s", (*args, limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    legs: dict[str, list[DictRow]] = {r["trip_id"]: [] for r in rows}
    if rows:
        for leg in await fetch(conn, "SELECT * FROM legs WHERE trip_id = ANY(%s)", (list(legs),)):
            legs[leg["trip_id"]].append(leg)
    trips = [trip_from_rows(r, legs[r["trip_id"]]) for r in rows]
    return trips, (int(rows[-1]["seq"]) if more else None)
