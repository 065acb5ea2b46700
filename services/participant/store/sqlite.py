"""A participant's books in a SQLite file: every protocol step as one local transaction.

The meaning is the port's (`services.participant.store`); this is its SQL for
SQLite. One writer thread commits steps in groups (`tripmesh.runtime.database`):
a step runs alone on the books, so it reads and then writes without locks.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

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
from tripmesh.runtime.database import Database, connect, migrate, sql_values
from tripmesh.runtime.errors import FieldViolation
from tripmesh.runtime.fields import quote

SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
  resource_id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
  attributes TEXT NOT NULL DEFAULT '{}'
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
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
  reservation_id TEXT PRIMARY KEY,
  trip_id TEXT NOT NULL,
  protocol TEXT NOT NULL CHECK (protocol IN ({protocols})),
  status TEXT NOT NULL CHECK (status IN ({statuses})),
  resource_id TEXT,
  start_date TEXT,
  days INTEGER,
  quantity INTEGER,
  price_cents INTEGER NOT NULL DEFAULT 0,
  reason TEXT NOT NULL DEFAULT '',
  settled_by TEXT NOT NULL DEFAULT '',
  created_at REAL NOT NULL,
  updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_status ON reservations(status, updated_at);
CREATE INDEX IF NOT EXISTS reservations_by_trip ON reservations(trip_id);
""".replace("{protocols}", sql_values(Protocol)).replace(
    "{statuses}", sql_values(ReservationStatus)
)
# Bumped whenever SCHEMA changes; books written by another version are refused at
# start-up rather than misread.
SCHEMA_VERSION = 2

_S = ReservationStatus


class SqliteParticipantStore(ParticipantStore):
    """The books of one participant in the SQLite file at `path`. Every method is one
    transaction on the database's writer thread (reads on its readers)."""

    def __init__(self, path: Path | str, *, kind: str = "resource") -> None:
        self.db = Database(path)
        self.location = str(self.db.path)
        self.db.run_sync(migrate(SCHEMA, SCHEMA_VERSION, table="reservations", what="these books"))
        # The choreographed saga's events, written with the step they report (a table
        # of its own: books without it are read as before, and gain it).
        self.db.run_sync(outbox.create)
        self.outbox = outbox.SqliteOutbox(self.db)
        self.kind = kind  # "flight", "hotel", "car": for messages

    def close(self) -> None:
        self.db.close()

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        self.db.on_writer_death(callback)

    def seed(self, resources: tuple[SeedResource, ...], start: dt.date, days: int) -> bool:
        return self.db.run_sync(lambda c: _seed(c, resources, start, days))

    def units(self) -> list[Units]:
        # On the scraping thread, with a read-only connection of its own.
        conn = connect(self.db.path, readonly=True)
        try:
            return [
                (str(r), int(a), int(h), int(c))
                for r, a, h, c in conn.execute(
                    "SELECT resource_id, sum(available), sum(held), sum(confirmed) FROM inventory"
                    " GROUP BY resource_id"
                )
            ]
        finally:
            conn.close()

    # -- 2PC -------------------------------------------------------------
    async def prepare(self, reservation_id: str, trip_id: str, hold: Hold) -> StepResult:
        return await self.db.run(
            lambda c: _take(c, self.kind, reservation_id, trip_id, hold, Protocol.TWO_PHASE_COMMIT)
        )

    async def commit(self, reservation_id: str, trip_id: str, *, settled_by: str) -> Reservation:
        return await self.db.run(
            lambda c: _commit(c, reservation_id, Protocol.TWO_PHASE_COMMIT, settled_by)
        )

    async def abort(
        self,
        reservation_id: str,
        trip_id: str,
        *,
        settled_by: str,
        protocol: Protocol = Protocol.TWO_PHASE_COMMIT,
    ) -> Reservation:
        """Release a 2PC or 3PC hold (a tombstone if nothing is known yet)."""
        return await self.db.run(
            lambda c: _give_back(c, reservation_id, trip_id, protocol, settled_by)
        )

    # -- 3PC -------------------------------------------------------------
    async def can_commit(self, reservation_id: str, trip_id: str, hold: Hold) -> StepResult:
        return await self.db.run(
            lambda c: _take(
                c, self.kind, reservation_id, trip_id, hold, Protocol.THREE_PHASE_COMMIT
            )
        )

    async def pre_commit(self, reservation_id: str, trip_id: str) -> Reservation:
        return await self.db.run(lambda c: _pre_commit(c, reservation_id))

    async def do_commit(self, reservation_id: str, trip_id: str, *, settled_by: str) -> Reservation:
        return await self.db.run(
            lambda c: _commit(c, reservation_id, Protocol.THREE_PHASE_COMMIT, settled_by)
        )

    async def settle_timed_out(
        self, *, waiting_for: float, pre_committed_for: float
    ) -> list[Reservation]:
        """3PC's own decisions: abort a yes vote that heard no PreCommit for `waiting_for`
        seconds; commit a pre-committed hold that heard nothing more for `pre_committed_for`.
        Returns what was settled (settled_by "timeout")."""
        now = time.time()
        return await self.db.run(
            lambda c: _settle_timed_out(c, now - waiting_for, now - pre_committed_for)
        )

    # -- saga ------------------------------------------------------------
    async def reserve(
        self, reservation_id: str, trip_id: str, hold: Hold, *, pending: bool = False
    ) -> StepResult:
        """Take units for a saga: confirmed at once, or PENDING (held) under a semantic lock."""
        return await self.db.run(
            lambda c: _take(
                c, self.kind, reservation_id, trip_id, hold, Protocol.SAGA, pending=pending
            )
        )

    async def cancel(
        self, reservation_id: str, trip_id: str, *, settled_by: str = "coordinator"
    ) -> Reservation:
        return await self.db.run(
            lambda c: _give_back(c, reservation_id, trip_id, Protocol.SAGA, settled_by)
        )

    async def confirm(
        self, reservation_id: str, trip_id: str, *, settled_by: str = "coordinator"
    ) -> Reservation:
        """Semantic lock lifted: a PENDING saga leg becomes confirmed."""
        return await self.db.run(lambda c: _confirm_pending(c, reservation_id, settled_by))

    # -- the choreographed saga: the step and the event it must publish, one transaction
    async def reserve_and_tell(
        self, reservation_id: str, trip_id: str, hold: Hold, tell: Tell
    ) -> StepResult:
        """A saga Reserve, and `tell(result)`'s event queued in the outbox with it."""

        def job(conn: sqlite3.Connection) -> StepResult:
            result = _take(conn, self.kind, reservation_id, trip_id, hold, Protocol.SAGA)
            outbox.add(conn, *tell(result))
            return result

        return await self.db.run(job)

    async def tell(self, told: Told) -> None:
        """Queue an event that reports no step of ours (a request we had to refuse)."""
        await self.db.run(lambda conn: outbox.add(conn, *told))

    async def cancel_and_tell(
        self, reservation_id: str, trip_id: str, tell: Callable[[Reservation], Told]
    ) -> Reservation:
        """A saga Cancel (a tombstone if nothing was taken), and its event queued with it."""

        def job(conn: sqlite3.Connection) -> Reservation:
            failpoints.hit("participant.before_cancel")
            reservation = _give_back(conn, reservation_id, trip_id, Protocol.SAGA, "choreography")
            outbox.add(conn, *tell(reservation))
            return reservation

        return await self.db.run(job)

    # -- audit -------------------------------------------------------------
    async def inventory(self, resource_id: str, first: str, last: str) -> list[InventoryDay]:
        return await self.db.read(lambda c: read_inventory(c, self.kind, resource_id, first, last))

    async def reservations(
        self, *, after: int, limit: int, status: ReservationStatus | None, trip_id: str
    ) -> tuple[list[Reservation], int | None]:
        return await self.db.read(lambda c: read_reservations(c, after, limit, status, trip_id))

    async def totals(self) -> list[tuple[str, int, int, int, int, int]]:
        """(resource, capacity, available, held, confirmed, pending) summed over every date;
        pending is the part of held that sagas took PENDING under a semantic lock."""
        return await self.db.read(
            lambda c: [
                tuple(r)
                for r in c.execute(
                    "SELECT i.resource_id, sum(i.capacity), sum(i.available), sum(i.held),"
                    " sum(i.confirmed), coalesce(p.units, 0) FROM inventory i LEFT JOIN"
                    " (SELECT resource_id, sum(quantity * days) AS units FROM reservations"
                    "  WHERE status = 'pending' GROUP BY resource_id) p USING (resource_id)"
                    " GROUP BY i.resource_id ORDER BY i.resource_id"
                )
            ]
        )

    async def in_doubt(self, older_than: float) -> list[Reservation]:
        """2PC holds and a saga's PENDING legs untouched for `older_than` seconds: ask the
        coordinator about them. (A 3PC hold is never asked about: it decides on its own
        time-out.)"""
        cutoff = time.time() - older_than
        return await self.db.read(
            lambda c: [
                row_to_reservation(r)
                for r in c.execute(
                    "SELECT * FROM reservations WHERE ((status = 'held' AND protocol = ?)"
                    " OR status = 'pending') AND updated_at <= ? ORDER BY updated_at LIMIT 500",
                    (Protocol.TWO_PHASE_COMMIT.value, cutoff),
                )
            ]
        )

    async def resources(self, *, after: str, limit: int) -> list[Resource]:
        return await self.db.read(lambda c: read_resources(c, after, limit))

    async def search(
        self, attributes: dict[str, str], first: dt.date, days: int, quantity: int
    ) -> list[Availability]:
        return await self.db.read(lambda c: _search(c, attributes, first, days, quantity))


def _load(conn: sqlite3.Connection, reservation_id: str) -> Reservation | None:
    row = conn.execute(
        "SELECT * FROM reservations WHERE reservation_id = ?", (reservation_id,)
    ).fetchone()
    return row_to_reservation(row) if row else None


def _take(
    conn: sqlite3.Connection,
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
    existing = _load(conn, reservation_id)
    if existing is not None:
        return replay_take(existing, hold, protocol)

    dates = hold.dates
    price, least = _price_and_least_available(conn, kind, hold, dates)
    status = taken_status(protocol, pending=pending)
    target = status.column
    assert target is not None
    if least >= hold.quantity:
        # Every date has room (this thread is the only writer, and the CHECK
        # constraints refuse a negative count whatever happens): take them all.
        _move(conn, hold, "available", target)
        reason = ""
    else:
        status, reason, price = _S.REFUSED, sold_out(hold.quantity), 0
    now = time.time()
    conn.execute(
        "INSERT INTO reservations (reservation_id, trip_id, protocol, status, resource_id,"
        " start_date, days, quantity, price_cents, reason, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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


def _commit(
    conn: sqlite3.Connection, reservation_id: str, protocol: Protocol, settled_by: str
) -> Reservation:
    """2PC Commit, or 3PC DoCommit: held units become confirmed."""
    existing = known(
        _load(conn, reservation_id), f"cannot commit {reservation_id}: it was never prepared here"
    )
    hold = to_commit(existing, protocol)
    if hold is None:
        return existing
    _move(conn, hold, "held", "confirmed")
    return _set_status(conn, existing, _S.CONFIRMED, settled_by)


def _confirm_pending(conn: sqlite3.Connection, reservation_id: str, settled_by: str) -> Reservation:
    existing = known(
        _load(conn, reservation_id), f"cannot confirm {reservation_id}: it was never reserved here"
    )
    hold = to_confirm(existing)
    if hold is None:
        return existing
    _move(conn, hold, "held", "confirmed")
    return _set_status(conn, existing, _S.CONFIRMED, settled_by)


def _pre_commit(conn: sqlite3.Connection, reservation_id: str) -> Reservation:
    """3PC PreCommit: a yes vote becomes pre-committed (units stay held)."""
    existing = known(
        _load(conn, reservation_id), f"cannot pre-commit {reservation_id}: it never voted here"
    )
    if not to_pre_commit(existing):
        return existing  # a duplicate, or a late one after DoCommit: the outcome stands
    return _set_status(conn, existing, _S.PRE_COMMITTED, existing.settled_by)


def _settle_timed_out(
    conn: sqlite3.Connection, waiting_since: float, pre_committed_since: float
) -> list[Reservation]:
    settled = []
    rows = conn.execute(
        "SELECT * FROM reservations WHERE protocol = ?"
        " AND ((status = 'held' AND updated_at <= ?) OR (status = 'pre_committed' AND updated_at <= ?))"
        " ORDER BY updated_at LIMIT 500",
        (Protocol.THREE_PHASE_COMMIT.value, waiting_since, pre_committed_since),
    ).fetchall()
    for row in rows:
        found = row_to_reservation(row)
        due = timed_out(found, waiting_since, pre_committed_since)
        assert due is not None  # the query asked for exactly these
        hold, target, status, reason = due
        _move(conn, hold, "held", target)
        settled.append(_set_status(conn, found, status, "timeout", reason=reason))
    return settled


def _give_back(
    conn: sqlite3.Connection,
    reservation_id: str,
    trip_id: str,
    protocol: Protocol,
    settled_by: str,
) -> Reservation:
    """Abort (2PC, 3PC) or Cancel (saga); a tombstone when nothing is known yet. A
    refused step took nothing and stays refused, so no reader counts it as given back."""
    final = given_back_status(protocol)
    existing = _load(conn, reservation_id)
    if existing is None:
        now = time.time()
        conn.execute(
            "INSERT INTO reservations (reservation_id, trip_id, protocol, status, reason,"
            " settled_by, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
        return _load_required(conn, reservation_id)
    if given_back_already(existing, protocol):
        return existing
    taken = to_give_back(existing, protocol)
    if taken is not None:
        _move(conn, taken[0], taken[1], "available")
    return _set_status(conn, existing, final, settled_by)


def _move(conn: sqlite3.Connection, hold: Hold, source: str, target: str) -> None:
    dates = hold.dates
    moved = conn.execute(
        f"UPDATE inventory SET {source} = {source} - :q, {target} = {target} + :q"
        " WHERE resource_id = :r AND day >= :first AND day <= :last",
        {"q": hold.quantity, "r": hold.resource_id, "first": dates[0], "last": dates[-1]},
    ).rowcount
    if moved != len(dates):
        raise RuntimeError(f"inventory rows missing for {hold}")


def _set_status(
    conn: sqlite3.Connection,
    existing: Reservation,
    status: ReservationStatus,
    settled_by: str,
    *,
    reason: str | None = None,
) -> Reservation:
    """Move a reservation to `status` (and `reason`, when given); the record as it now is."""
    conn.execute(
        "UPDATE reservations SET status = ?, settled_by = ?, updated_at = ?,"
        " reason = coalesce(?, reason) WHERE reservation_id = ?",
        (status.value, settled_by, time.time(), reason, existing.reservation_id),
    )
    return _load_required(conn, existing.reservation_id)


def _price_and_least_available(
    conn: sqlite3.Connection, kind: str, hold: Hold, dates: list[str]
) -> tuple[int, int]:
    """The hold's price, and the fewest units available on any of `dates` (one query);
    refuses an unknown resource, and a date not on sale."""
    row = conn.execute(
        "SELECT r.price_cents, count(i.day), min(i.available) FROM resources r"
        " LEFT JOIN inventory i ON i.resource_id = r.resource_id AND i.day >= ? AND i.day <= ?"
        " WHERE r.resource_id = ?",
        (dates[0], dates[-1], hold.resource_id),
    ).fetchone()
    price_cents, count, least = row
    if price_cents is None:
        raise not_found(f"unknown {kind} {quote(hold.resource_id)}", "hold.resource_id")
    if count != len(dates):
        raise ParticipantError.invalid(
            FieldViolation(
                "hold.start_date",
                f"{kind} {hold.resource_id} is not on sale for every date"
                f" from {dates[0]} to {dates[-1]}",
            )
        )
    return int(price_cents) * hold.days * hold.quantity, int(least)


def _load_required(conn: sqlite3.Connection, reservation_id: str) -> Reservation:
    found = _load(conn, reservation_id)
    assert found is not None
    return found


# -- reads ---------------------------------------------------------------------------
def read_inventory(
    conn: sqlite3.Connection, kind: str, resource_id: str, first: str, last: str
) -> list[InventoryDay]:
    if (
        conn.execute("SELECT 1 FROM resources WHERE resource_id = ?", (resource_id,)).fetchone()
        is None
    ):
        raise not_found(f"unknown {kind} {quote(resource_id)}", "resource_id")
    rows = conn.execute(
        "SELECT day, capacity, available, held, confirmed FROM inventory"
        " WHERE resource_id = ? AND day >= ? AND day <= ? ORDER BY day",
        (resource_id, first or "0000-00-00", last or "9999-99-99"),
    )
    return [InventoryDay(*tuple(r)) for r in rows]


def read_reservations(
    conn: sqlite3.Connection,
    after: int,
    limit: int,
    status: ReservationStatus | None,
    trip_id: str,
) -> tuple[list[Reservation], int | None]:
    sql = "SELECT rowid AS seq, * FROM reservations WHERE rowid > ?"
    args: list[object] = [after]
    if status is not None:
        sql += " AND status = ?"
        args.append(status.value)
    if trip_id:
        sql += " AND trip_id = ?"
        args.append(trip_id)
    rows = conn.execute(sql + " ORDER BY rowid LIMIT ?", (*args, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return [row_to_reservation(r) for r in rows], (rows[-1]["seq"] if more else None)


def read_resources(conn: sqlite3.Connection, after: str, limit: int) -> list[Resource]:
    rows = conn.execute(
        "SELECT r.*, min(i.day) AS first_date, max(i.day) AS last_date FROM resources r"
        " LEFT JOIN inventory i USING (resource_id) WHERE r.resource_id > ?"
        " GROUP BY r.resource_id ORDER BY r.resource_id LIMIT ?",
        (after, limit),
    )
    return [
        Resource(
            r["resource_id"],
            r["name"],
            r["price_cents"],
            json.loads(r["attributes"]),
            r["first_date"] or "",
            r["last_date"] or "",
        )
        for r in rows
    ]


def _search(
    conn: sqlite3.Connection,
    attributes: dict[str, str],
    first: dt.date,
    days: int,
    quantity: int,
) -> list[Availability]:
    last = first + dt.timedelta(days=days - 1)
    sql = (
        "SELECT r.resource_id, r.name, r.price_cents, r.attributes,"
        " min(i.available) AS free, count(*) AS n"
        " FROM resources r JOIN inventory i USING (resource_id)"
        " WHERE i.day >= ? AND i.day <= ?"
    )
    args: list[object] = [first.isoformat(), last.isoformat()]
    for key, value in attributes.items():
        if value:
            sql += " AND upper(json_extract(r.attributes, ?)) = upper(?)"
            args += [f"$.{key}", value]
    sql += " GROUP BY r.resource_id HAVING n = ? AND free >= ? ORDER BY r.price_cents"
    return [
        Availability(
            r["resource_id"], r["name"], r["price_cents"], json.loads(r["attributes"]), r["free"]
        )
        for r in conn.execute(sql, (*args, days, quantity))
    ]


def _seed(
    conn: sqlite3.Connection, resources: tuple[SeedResource, ...], start: dt.date, days: int
) -> bool:
    if conn.execute("SELECT 1 FROM resources LIMIT 1").fetchone():
        return False
    conn.executemany(
        "INSERT INTO resources (resource_id, name, price_cents, attributes) VALUES (?, ?, ?, ?)",
        [(r.resource_id, r.name, r.price_cents, json.dumps(r.attributes)) for r in resources],
    )
    conn.executemany(
        "INSERT INTO inventory (resource_id, day, capacity, available) VALUES (?, ?, ?, ?)",
        [
            (r.resource_id, (start + dt.timedelta(days=i)).isoformat(), r.capacity, r.capacity)
            for r in resources
            for i in range(days)
        ],
    )
    return True
