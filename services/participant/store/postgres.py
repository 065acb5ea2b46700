"""A participant's books in a PostgreSQL database: every protocol step as one transaction.

The meaning is the port's (`services.participant.store`), and the tables and
their CHECK constraints are SQLite's (capacity = available + held + confirmed,
nothing negative, known protocols and statuses), written here for PostgreSQL;
how calls reach the server is `tripmesh.runtime.pgdatabase`'s (a pool on a
thread of its own, one transaction per call, faults as StorageUnavailable).

Unlike SQLite's single writer, steps run concurrently on separate
connections, so:

- **One reservation's steps take turns** in this process (their key is the
  reservation id) and apply in the order they arrived: a reservation row is
  only ever written under its turn. The books belong to one service process,
  as a SQLite file does.
- **Inventory rows are locked before they are read and moved**, always in
  date order (`SELECT ... ORDER BY day FOR UPDATE`): two steps on the same dates
  queue on the rows instead of both seeing the same free units, and no two
  steps can wait on each other in a cycle. The CHECK constraints stay the last
  guard, whatever the code does.
- **3PC's time-outs settle one reservation per transaction**, each under its
  turn, rechecked there: a PreCommit or an abort that came first wins.

`synchronous_commit` is on (the server's default, and `PostgresServer` sets it):
an acknowledged step is on disk.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from psycopg import AsyncCursor
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from services.participant.domain import (
    Availability,
    Hold,
    InventoryDay,
    ParticipantError,
    Protocol,
    Reservation,
    ReservationStatus,
    Resource,
    SeedResource,
    StepResult,
    not_found,
)
from services.participant.store import (
    TOMBSTONE,
    ParticipantStore,
    Tell,
    Told,
    Units,
    given_back_already,
    given_back_status,
    known,
    replay_take,
    row_to_reservation,
    sold_out,
    taken_status,
    timed_out,
    to_commit,
    to_confirm,
    to_give_back,
    to_pre_commit,
)
from tripmesh.runtime import failpoints, outbox
from tripmesh.runtime.database import sql_values
from tripmesh.runtime.errors import FieldViolation
from tripmesh.runtime.fields import quote
from tripmesh.runtime.pgdatabase import Conn, Job, PostgresDatabase, migrate
from tripmesh.runtime.pgdatabase import rows as fetch

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS resources (
  resource_id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
  attributes JSONB NOT NULL DEFAULT '{{}}'
);
CREATE TABLE IF NOT EXISTS inventory (
  resource_id TEXT NOT NULL REFERENCES resources(resource_id),
  day TEXT NOT NULL,
  capacity INTEGER NOT NULL CHECK (capacity >= 0),
  available INTEGER NOT NULL CHECK (available >= 0),
  held INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0),
  confirmed INTEGER NOT NULL DEFAULT 0 CHECK (confirmed >= 0),
  CHECK (available + held + confirmed = capacity),
  PRIMARY KEY (resource_id, day)
);
CREATE TABLE IF NOT EXISTS reservations (
  seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
  reservation_id TEXT PRIMARY KEY,
  trip_id TEXT NOT NULL,
  protocol TEXT NOT NULL CHECK (protocol IN ({sql_values(Protocol)})),
  status TEXT NOT NULL CHECK (status IN ({sql_values(ReservationStatus)})),
  resource_id TEXT,
  start_date TEXT,
  days INTEGER,
  quantity INTEGER,
  price_cents BIGINT NOT NULL DEFAULT 0,
  reason TEXT NOT NULL DEFAULT '',
  settled_by TEXT NOT NULL DEFAULT '',
  created_at DOUBLE PRECISION NOT NULL,
  updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_status ON reservations(status, updated_at);
CREATE INDEX IF NOT EXISTS reservations_by_trip ON reservations(trip_id);
{outbox.POSTGRES_SCHEMA}
"""
# This backend's own schema version: bumped whenever SCHEMA changes; books written by
# another version are refused at start-up rather than misread.
SCHEMA_VERSION = 1
_WHAT = "participant books"
_S = ReservationStatus
T = TypeVar("T")
# Columns a move may name (they are spliced into SQL, so only these).
_COLUMNS = frozenset({"available", "held", "confirmed"})


class PostgresParticipantStore(ParticipantStore):
    """The books of one participant in the PostgreSQL database at `dsn` (a libpq
    connection string). Construction connects, creates or checks the schema and fills
    the pool, blocking, as SQLite's does; the options are `PostgresDatabase`'s."""

    def __init__(self, dsn: str, *, kind: str = "resource", **options: Any) -> None:
        self.kind = kind  # "flight", "hotel", "car": for messages
        self.db = PostgresDatabase(
            dsn,
            migrate(SCHEMA, SCHEMA_VERSION, what=_WHAT, table="reservations"),
            what=f"{kind} books",
            **options,
        )
        self.location = _without_password(dsn)
        self.outbox = outbox.PostgresOutbox(self.db)

    def close(self) -> None:
        self.db.close()

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        self.db.on_failure(callback)

    def seed(self, resources: tuple[SeedResource, ...], start: dt.date, days: int) -> bool:
        return self.db.call_blocking(lambda c: _seed(c, resources, start, days), "write")

    def units(self) -> list[Units]:
        async def job(conn: Conn) -> list[Units]:
            cur = await conn.execute(
                "SELECT resource_id, sum(available), sum(held), sum(confirmed) FROM inventory"
                " GROUP BY resource_id ORDER BY resource_id"
            )
            return [(str(r), int(a), int(h), int(c)) for r, a, h, c in await cur.fetchall()]

        return self.db.call_blocking(job, "statement")

    async def _step(self, reservation_id: str, job: Job[T]) -> T:
        """A write of one reservation, in its turn."""
        return await self.db.call(job, "write", key=reservation_id)

    # -- 2PC -------------------------------------------------------------
    async def prepare(self, reservation_id: str, trip_id: str, hold: Hold) -> StepResult:
        return await self._take(reservation_id, trip_id, hold, Protocol.TWO_PHASE_COMMIT)

    async def commit(self, reservation_id: str, trip_id: str, *, settled_by: str) -> Reservation:
        return await self._step(
            reservation_id,
            lambda c: _commit(c, reservation_id, Protocol.TWO_PHASE_COMMIT, settled_by),
        )

    async def abort(
        self,
        reservation_id: str,
        trip_id: str,
        *,
        settled_by: str,
        protocol: Protocol = Protocol.TWO_PHASE_COMMIT,
    ) -> Reservation:
        return await self._step(
            reservation_id, lambda c: _give_back(c, reservation_id, trip_id, protocol, settled_by)
        )

    # -- 3PC -------------------------------------------------------------
    async def can_commit(self, reservation_id: str, trip_id: str, hold: Hold) -> StepResult:
        return await self._take(reservation_id, trip_id, hold, Protocol.THREE_PHASE_COMMIT)

    async def pre_commit(self, reservation_id: str, trip_id: str) -> Reservation:
        return await self._step(reservation_id, lambda c: _pre_commit(c, reservation_id))

    async def do_commit(self, reservation_id: str, trip_id: str, *, settled_by: str) -> Reservation:
        return await self._step(
            reservation_id,
            lambda c: _commit(c, reservation_id, Protocol.THREE_PHASE_COMMIT, settled_by),
        )

    async def settle_timed_out(
        self, *, waiting_for: float, pre_committed_for: float
    ) -> list[Reservation]:
        now = time.time()
        waiting_since, pre_committed_since = now - waiting_for, now - pre_committed_for

        async def due(conn: Conn) -> list[str]:
            cur = await conn.execute(
                "SELECT reservation_id FROM reservations WHERE protocol = %s"
                " AND ((status = 'held' AND updated_at <= %s)"
                " OR (status = 'pre_committed' AND updated_at <= %s))"
                " ORDER BY updated_at LIMIT 500",
                (Protocol.THREE_PHASE_COMMIT.value, waiting_since, pre_committed_since),
            )
            return [str(r[0]) for r in await cur.fetchall()]

        settled = []
        for reservation_id in await self.db.call(due, "statement"):
            settle = functools.partial(
                _settle_one,
                reservation_id=reservation_id,
                waiting_since=waiting_since,
                pre_committed_since=pre_committed_since,
            )
            done = await self._step(reservation_id, settle)
            if done is not None:
                settled.append(done)
        return settled

    # -- saga ------------------------------------------------------------
    async def reserve(
        self, reservation_id: str, trip_id: str, hold: Hold, *, pending: bool = False
    ) -> StepResult:
        return await self._take(reservation_id, trip_id, hold, Protocol.SAGA, pending=pending)

    async def cancel(
        self, reservation_id: str, trip_id: str, *, settled_by: str = "coordinator"
    ) -> Reservation:
        return await self._step(
            reservation_id,
            lambda c: _give_back(c, reservation_id, trip_id, Protocol.SAGA, settled_by),
        )

    async def confirm(
        self, reservation_id: str, trip_id: str, *, settled_by: str = "coordinator"
    ) -> Reservation:
        return await self._step(
            reservation_id, lambda c: _confirm_pending(c, reservation_id, settled_by)
        )

    async def _take(
        self,
        reservation_id: str,
        trip_id: str,
        hold: Hold,
        protocol: Protocol,
        *,
        pending: bool = False,
    ) -> StepResult:
        return await self._step(
            reservation_id,
            lambda c: _take(c, self.kind, reservation_id, trip_id, hold, protocol, pending=pending),
        )

    # -- the choreographed saga ------------------------------------------------------
    async def reserve_and_tell(
        self, reservation_id: str, trip_id: str, hold: Hold, tell: Tell
    ) -> StepResult:
        async def job(conn: Conn) -> StepResult:
            result = await _take(conn, self.kind, reservation_id, trip_id, hold, Protocol.SAGA)
            await outbox.add_postgres(conn, *tell(result))
            return result

        return await self._step(reservation_id, job)

    async def tell(self, told: Told) -> None:
        await self.db.call(lambda conn: outbox.add_postgres(conn, *told), "write")

    async def cancel_and_tell(
        self, reservation_id: str, trip_id: str, tell: Callable[[Reservation], Told]
    ) -> Reservation:
        async def job(conn: Conn) -> Reservation:
            failpoints.hit("participant.before_cancel")
            reservation = await _give_back(
                conn, reservation_id, trip_id, Protocol.SAGA, "choreography"
            )
            await outbox.add_postgres(conn, *tell(reservation))
            return reservation

        return await self._step(reservation_id, job)

    # -- reads -------------------------------------------------------------
    async def inventory(self, resource_id: str, first: str, last: str) -> list[InventoryDay]:
        async def job(conn: Conn) -> list[InventoryDay]:
            cur = await conn.execute(
                "SELECT 1 FROM resources WHERE resource_id = %s", (resource_id,)
            )
            if await cur.fetchone() is None:
                raise not_found(f"unknown {self.kind} {quote(resource_id)}", "resource_id")
            cur = await conn.execute(
                "SELECT day, capacity, available, held, confirmed FROM inventory"
                " WHERE resource_id = %s AND day >= %s AND day <= %s ORDER BY day",
                (resource_id, first or "0000-00-00", last or "9999-99-99"),
            )
            return [InventoryDay(*r) for r in await cur.fetchall()]

        return await self.db.call(job, "snapshot")

    async def reservations(
        self, *, after: int, limit: int, status: ReservationStatus | None, trip_id: str
    ) -> tuple[list[Reservation], int | None]:
        sql = "SELECT * FROM reservations WHERE seq > %s"
        args: list[object] = [after]
        if status is not None:
            sql += " AND status = %s"
            args.append(status.value)
        if trip_id:
            sql += " AND trip_id = %s"
            args.append(trip_id)

        async def job(conn: Conn) -> tuple[list[Reservation], int | None]:
            found = await fetch(conn, sql + " ORDER BY seq LIMIT %s", (*args, limit + 1))
            more = len(found) > limit
            found = found[:limit]
            return [row_to_reservation(r) for r in found], (found[-1]["seq"] if more else None)

        return await self.db.call(job, "statement")

    async def totals(self) -> list[tuple[str, int, int, int, int, int]]:
        async def job(conn: Conn) -> list[tuple[str, int, int, int, int, int]]:
            cur = await conn.execute(
                "SELECT i.resource_id, sum(i.capacity), sum(i.available), sum(i.held),"
                " sum(i.confirmed), coalesce(max(p.units), 0) FROM inventory i LEFT JOIN"
                " (SELECT resource_id, sum(quantity * days) AS units FROM reservations"
                "  WHERE status = 'pending' GROUP BY resource_id) p USING (resource_id)"
                " GROUP BY i.resource_id ORDER BY i.resource_id"
            )
            return [
                (str(r), int(c), int(a), int(h), int(f), int(p))
                for r, c, a, h, f, p in await cur.fetchall()
            ]

        return await self.db.call(job, "statement")

    async def in_doubt(self, older_than: float) -> list[Reservation]:
        cutoff = time.time() - older_than

        async def job(conn: Conn) -> list[Reservation]:
            found = await fetch(
                conn,
                "SELECT * FROM reservations WHERE ((status = 'held' AND protocol = %s)"
                " OR status = 'pending') AND updated_at <= %s ORDER BY updated_at LIMIT 500",
                (Protocol.TWO_PHASE_COMMIT.value, cutoff),
            )
            return [row_to_reservation(r) for r in found]

        return await self.db.call(job, "statement")

    async def resources(self, *, after: str, limit: int) -> list[Resource]:
        async def job(conn: Conn) -> list[Resource]:
            found = await fetch(
                conn,
                "SELECT r.resource_id, r.name, r.price_cents, r.attributes,"
                " min(i.day) AS first_date, max(i.day) AS last_date FROM resources r"
                " LEFT JOIN inventory i USING (resource_id) WHERE r.resource_id > %s"
                " GROUP BY r.resource_id ORDER BY r.resource_id LIMIT %s",
                (after, limit),
            )
            return [
                Resource(
                    r["resource_id"],
                    r["name"],
                    r["price_cents"],
                    dict(r["attributes"]),
                    r["first_date"] or "",
                    r["last_date"] or "",
                )
                for r in found
            ]

        return await self.db.call(job, "statement")

    async def search(
        self, attributes: dict[str, str], first: dt.date, days: int, quantity: int
    ) -> list[Availability]:
        last = first + dt.timedelta(days=days - 1)
        sql = (
            "SELECT r.resource_id, r.name, r.price_cents, r.attributes,"
            " min(i.available) AS free FROM resources r JOIN inventory i USING (resource_id)"
            " WHERE i.day >= %s AND i.day <= %s"
        )
        args: list[object] = [first.isoformat(), last.isoformat()]
        for key, value in attributes.items():
            if value:
                sql += " AND upper(r.attributes ->> %s) = upper(%s)"
                args += [key, value]
        sql += (
            " GROUP BY r.resource_id HAVING count(*) = %s AND min(i.available) >= %s"
            " ORDER BY r.price_cents, r.resource_id"
        )

        async def job(conn: Conn) -> list[Availability]:
            found = await fetch(conn, sql, (*args, days, quantity))
            return [
                Availability(
                    r["resource_id"],
                    r["name"],
                    r["price_cents"],
                    dict(r["attributes"]),
                    r["free"],
                )
                for r in found
            ]

        return await self.db.call(job, "statement")


def _without_password(dsn: str) -> str:
    parts = conninfo_to_dict(dsn)
    if "password" in parts:
        parts["password"] = "***"
    return make_conninfo("", **parts)


async def _load(conn: Conn, reservation_id: str) -> Reservation | None:
    found = await fetch(
        conn, "SELECT * FROM reservations WHERE reservation_id = %s", (reservation_id,)
    )
    return row_to_reservation(found[0]) if found else None


async def _take(
    conn: Conn,
    kind: str,
    reservation_id: str,
    trip_id: str,
    hold: Hold,
    protocol: Protocol,
    *,
    pending: bool = False,
) -> StepResult:
    """Prepare or CanCommit (available -> held), or Reserve (saga: available -> confirmed,
    or -> held as PENDING under a semantic lock)."""
    failpoints.hit("participant.take")
    # The reservation, the price and the dates (locked) asked at once: one round trip.
    known = conn.cursor(row_factory=dict_row)
    await known.execute("SELECT * FROM reservations WHERE reservation_id = %s", (reservation_id,))
    priced = await conn.execute(
        "SELECT price_cents FROM resources WHERE resource_id = %s", (hold.resource_id,)
    )
    locked = await _lock_days(conn, hold)
    found = await known.fetchone()
    if found is not None:
        return replay_take(row_to_reservation(found), hold, protocol)
    row = await priced.fetchone()
    if row is None:
        raise not_found(f"unknown {kind} {quote(hold.resource_id)}", "hold.resource_id")
    price = int(row[0]) * hold.days * hold.quantity
    dates = hold.dates
    free = [int(r[0]) for r in await locked.fetchall()]
    if len(free) != len(dates):
        raise ParticipantError.invalid(
            FieldViolation(
                "hold.start_date",
                f"{kind} {hold.resource_id} is not on sale for every date"
                f" from {dates[0]} to {dates[-1]}",
            )
        )
    status = taken_status(protocol, pending=pending)
    target = status.column
    assert target is not None
    if min(free) >= hold.quantity:
        await _move(conn, hold, "available", target, locked=True)
        reason = ""
    else:
        status, reason, price = _S.REFUSED, sold_out(hold.quantity), 0
    now = time.time()
    await conn.execute(
        "INSERT INTO reservations (reservation_id, trip_id, protocol, status, resource_id,"
        " start_date, days, quantity, price_cents, reason, created_at, updated_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            reservation_id,
            trip_id,
            protocol.value,
            status.value,
            hold.resource_id,
            hold.start_date.isoformat(),
            hold.days,
            hold.quantity,
            price,
            reason,
            now,
            now,
        ),
    )
    reservation = Reservation(
        reservation_id, trip_id, protocol, status, hold, price, reason, "", now, now
    )
    return StepResult(status is not _S.REFUSED, reason, reservation)


async def _commit(
    conn: Conn, reservation_id: str, protocol: Protocol, settled_by: str
) -> Reservation:
    """2PC Commit, or 3PC DoCommit: held units become confirmed."""
    existing = known(
        await _load(conn, reservation_id),
        f"cannot commit {reservation_id}: it was never prepared here",
    )
    hold = to_commit(existing, protocol)
    if hold is None:
        return existing
    await _move(conn, hold, "held", "confirmed")
    return await _set_status(conn, existing, _S.CONFIRMED, settled_by)


async def _confirm_pending(conn: Conn, reservation_id: str, settled_by: str) -> Reservation:
    existing = known(
        await _load(conn, reservation_id),
        f"cannot confirm {reservation_id}: it was never reserved here",
    )
    hold = to_confirm(existing)
    if hold is None:
        return existing
    await _move(conn, hold, "held", "confirmed")
    return await _set_status(conn, existing, _S.CONFIRMED, settled_by)


async def _pre_commit(conn: Conn, reservation_id: str) -> Reservation:
    """3PC PreCommit: a yes vote becomes pre-committed (units stay held)."""
    existing = known(
        await _load(conn, reservation_id),
        f"cannot pre-commit {reservation_id}: it never voted here",
    )
    if not to_pre_commit(existing):
        return existing  # a duplicate, or a late one after DoCommit: the outcome stands
    return await _set_status(conn, existing, _S.PRE_COMMITTED, existing.settled_by)


async def _settle_one(
    conn: Conn, reservation_id: str, waiting_since: float, pre_committed_since: float
) -> Reservation | None:
    """One 3PC hold's own time-out, if it is still due (else None: something came first)."""
    found = await _load(conn, reservation_id)
    due = None if found is None else timed_out(found, waiting_since, pre_committed_since)
    if found is None or due is None:
        return None
    hold, target, status, reason = due
    await _move(conn, hold, "held", target)
    return await _set_status(conn, found, status, "timeout", reason=reason)


async def _give_back(
    conn: Conn, reservation_id: str, trip_id: str, protocol: Protocol, settled_by: str
) -> Reservation:
    """Abort (2PC, 3PC) or Cancel (saga); a tombstone when nothing is known yet. A
    refused step took nothing and stays refused, so no reader counts it as given back."""
    final = given_back_status(protocol)
    existing = await _load(conn, reservation_id)
    if existing is None:
        now = time.time()
        await conn.execute(
            "INSERT INTO reservations (reservation_id, trip_id, protocol, status, reason,"
            " settled_by, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                reservation_id,
                trip_id,
                protocol.value,
                final.value,
                TOMBSTONE,
                settled_by,
                now,
                now,
            ),
        )
        return await _load_required(conn, reservation_id)
    if given_back_already(existing, protocol):
        return existing
    taken = to_give_back(existing, protocol)
    if taken is not None:
        await _move(conn, taken[0], taken[1], "available")
    return await _set_status(conn, existing, final, settled_by)


async def _lock_days(conn: Conn, hold: Hold) -> AsyncCursor[Any]:
    """Lock the hold's inventory rows, in date order (until the transaction ends); the
    cursor whose rows are the units available on each date, read when needed (pipelined:
    the lock goes out with whatever follows)."""
    dates = hold.dates
    return await conn.execute(
        "SELECT available FROM inventory WHERE resource_id = %s AND day >= %s AND day <= %s"
        " ORDER BY day FOR UPDATE",
        (hold.resource_id, dates[0], dates[-1]),
    )


async def _move(conn: Conn, hold: Hold, source: str, target: str, *, locked: bool = False) -> None:
    """Move the hold's units from one column to another on each of its dates (locking the
    rows in date order first, unless the caller has)."""
    assert source in _COLUMNS and target in _COLUMNS
    dates = hold.dates
    lock = None if locked else await _lock_days(conn, hold)
    await conn.execute(
        f"UPDATE inventory SET {source} = {source} - %(q)s, {target} = {target} + %(q)s"
        " WHERE resource_id = %(r)s AND day >= %(first)s AND day <= %(last)s",
        {"q": hold.quantity, "r": hold.resource_id, "first": dates[0], "last": dates[-1]},
    )
    # Read after both went out (one round trip): the rows the update moved were all there.
    if lock is not None and len(await lock.fetchall()) != len(dates):
        raise RuntimeError(f"inventory rows missing for {hold}")


async def _set_status(
    conn: Conn,
    existing: Reservation,
    status: ReservationStatus,
    settled_by: str,
    *,
    reason: str | None = None,
) -> Reservation:
    """Move a reservation to `status` (and `reason`, when given); the record as it now is
    (computed, not read back: the update goes out pipelined with the COMMIT)."""
    now = time.time()
    await conn.execute(
        "UPDATE reservations SET status = %s, settled_by = %s, updated_at = %s,"
        " reason = coalesce(%s, reason) WHERE reservation_id = %s",
        (status.value, settled_by, now, reason, existing.reservation_id),
    )
    return dataclasses.replace(
        existing,
        status=status,
        settled_by=settled_by,
        updated_at=now,
        reason=existing.reason if reason is None else reason,
    )


async def _load_required(conn: Conn, reservation_id: str) -> Reservation:
    found = await _load(conn, reservation_id)
    assert found is not None
    return found


async def _seed(conn: Conn, resources: Sequence[SeedResource], start: dt.date, days: int) -> bool:
    cur = await conn.execute("SELECT 1 FROM resources LIMIT 1")
    if await cur.fetchone() is not None:
        return False
    async with conn.cursor() as c:
        await c.executemany(
            "INSERT INTO resources (resource_id, name, price_cents, attributes)"
            " VALUES (%s, %s, %s, %s)",
            [(r.resource_id, r.name, r.price_cents, Jsonb(r.attributes)) for r in resources],
        )
        await c.executemany(
            "INSERT INTO inventory (resource_id, day, capacity, available) VALUES (%s, %s, %s, %s)",
            [
                (r.resource_id, (start + dt.timedelta(days=i)).isoformat(), r.capacity, r.capacity)
                for r in resources
                for i in range(days)
            ],
        )
    return True
