"""The trip store in SQLite: the embedded default, one file beside the coordinator.

Writes go through the group-commit `Database` (many trips share one fsync);
reads run on their own connections and never wait for a write batch.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

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
from coordinator.store import Told, TripQuery, TripStore, page_filter, trip_from_rows
from tripmesh.runtime import failpoints, outbox
from tripmesh.runtime.database import Database, migrate, sql_values
from tripmesh.runtime.errors import ErrorKind
from tripmesh.runtime.fields import quote
from tripmesh.runtime.outbox import SqliteOutbox

TRIPS_TABLE = f"""
CREATE TABLE IF NOT EXISTS trips (
  trip_id TEXT PRIMARY KEY,
  protocol TEXT NOT NULL CHECK (protocol IN ({sql_values(Protocol)})),
  status TEXT NOT NULL CHECK (status IN ({sql_values(TripStatus)})),
  decision TEXT CHECK (decision IN ({sql_values(Decision)})),
  request TEXT NOT NULL,
  failure_reason TEXT NOT NULL DEFAULT '',
  attention TEXT CHECK (attention IN ({sql_values(Attention)})),
  attention_detail TEXT NOT NULL DEFAULT '',
  created_at REAL NOT NULL,
  updated_at REAL NOT NULL,
  CHECK ((status = 'needs_attention') = (attention IS NOT NULL))
)"""
SCHEMA = f"""{TRIPS_TABLE};
CREATE INDEX IF NOT EXISTS trips_by_status ON trips(status);
CREATE TABLE IF NOT EXISTS legs (
  trip_id TEXT NOT NULL REFERENCES trips(trip_id),
  kind TEXT NOT NULL,
  reservation_id TEXT NOT NULL UNIQUE,
  status TEXT NOT NULL,
  price_cents INTEGER NOT NULL DEFAULT 0,
  reason TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (trip_id, kind)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency_keys (
  key TEXT PRIMARY KEY,
  trip_id TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_keys_by_age ON idempotency_keys(created_at);
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  trip_id TEXT NOT NULL,
  at REAL NOT NULL,
  kind TEXT NOT NULL,
  leg TEXT NOT NULL DEFAULT '',
  detail TEXT NOT NULL DEFAULT '',
  actor TEXT NOT NULL DEFAULT 'coordinator'
);
CREATE INDEX IF NOT EXISTS events_by_trip ON events(trip_id, seq);
"""
# Bumped whenever SCHEMA changes; a store written by another version is refused
# at start-up rather than misread, unless `_upgrade` knows the way (3 -> 4: the
# choreographed saga widened the protocol and attention CHECKs).
SCHEMA_VERSION = 4
_STILL_DRIVEN = tuple(a.value for a in Attention if a.still_driven)


def _upgrade(path: Path) -> None:
    """Bring a version-3 store to version 4 by SQLite's own recipe for changing a table's
    CHECKs (https://sqlite.org/lang_altertable.html#otheralter): foreign keys off, a new
    table, the rows copied, the old one dropped, the new one renamed, in one transaction."""
    if not path.exists():
        return
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] != 3:
            return
        conn.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: set first
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(TRIPS_TABLE.replace("EXISTS trips (", "EXISTS trips_v4 (", 1))
        conn.execute("INSERT INTO trips_v4 SELECT * FROM trips")
        conn.execute("DROP TABLE trips")
        conn.execute("ALTER TABLE trips_v4 RENAME TO trips")
        conn.execute("CREATE INDEX IF NOT EXISTS trips_by_status ON trips(status)")
        if conn.execute("PRAGMA foreign_key_check").fetchone() is not None:
            raise RuntimeError(f"{path}: upgrading the trip store broke a foreign key")
        conn.execute("PRAGMA user_version = 4")
        conn.execute("COMMIT")
    finally:
        conn.close()


class SqliteTripStore(TripStore):
    def __init__(self, path: Path | str) -> None:
        _upgrade(Path(path))
        self.db = Database(path)
        self.db.run_sync(migrate(SCHEMA, SCHEMA_VERSION, table="trips", what="the trip store"))
        # The choreographed saga's TRIP_REQUESTED, written with the trip it requests.
        self.db.run_sync(outbox.create)
        self._outbox = SqliteOutbox(self.db)

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        self.db.on_writer_death(callback)

    def close(self) -> None:
        self.db.close()

    # -- writes ------------------------------------------------------------------
    async def create(self, request: TripRequest) -> tuple[Trip, bool]:
        fingerprint, body = request.fingerprint_and_json()
        return await self.db.run(lambda c: _create(c, request, fingerprint, body))

    async def write(
        self, trip_id: str, change: Change, now: float, *, tell: Sequence[Told] = ()
    ) -> None:
        def job(conn: sqlite3.Connection) -> None:
            _write(conn, trip_id, change, now)
            for event, subject in tell:
                outbox.add(conn, event, subject)

        await self.db.run(job)

    @property
    def outbox(self) -> SqliteOutbox:
        return self._outbox

    async def purge_keys(self, older_than: float) -> int:
        cutoff = time.time() - older_than
        return await self.db.run(
            lambda c: (
                c.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (cutoff,)).rowcount
            )
        )

    # -- reads -------------------------------------------------------------------
    async def get(self, trip_id: str) -> Trip | None:
        return await self.db.read(lambda c: _get(c, trip_id))

    async def events(self, trip_id: str) -> list[TripEvent]:
        return await self.db.read(lambda c: _events(c, trip_id))

    async def decision(self, trip_id: str) -> tuple[bool, Decision | None]:
        def job(conn: sqlite3.Connection) -> tuple[bool, Decision | None]:
            row = conn.execute(
                "SELECT decision FROM trips WHERE trip_id = ?", (trip_id,)
            ).fetchone()
            if row is None:
                return False, None
            return True, Decision(row["decision"]) if row["decision"] else None

        return await self.db.read(job)

    async def list_trips(
        self, query: TripQuery, *, before: int, limit: int
    ) -> tuple[list[Trip], int | None]:
        return await self.db.read(lambda c: _page(c, query, before, limit))

    async def unfinished(self) -> list[str]:
        marks = ", ".join("?" * len(_STILL_DRIVEN))
        return await self.db.read(
            lambda c: [
                r["trip_id"]
                for r in c.execute(
                    "SELECT trip_id FROM trips WHERE status = 'pending'"
                    f" OR (status = 'needs_attention' AND attention IN ({marks}))"
                    " ORDER BY rowid",
                    _STILL_DRIVEN,
                )
            ]
        )

    async def counts(self) -> dict[TripStatus, int]:
        return await self.db.read(
            lambda c: {
                TripStatus(r[0]): r[1]
                for r in c.execute("SELECT status, count(*) FROM trips GROUP BY status")
            }
        )

    async def in_doubt(self) -> int:
        def job(conn: sqlite3.Connection) -> int:
            (count,) = conn.execute(
                "SELECT count(*) FROM trips WHERE protocol IN (?, ?) AND decision IS NOT NULL"
                " AND status IN ('pending', 'needs_attention')",
                (Protocol.TWO_PHASE_COMMIT.value, Protocol.THREE_PHASE_COMMIT.value),
            ).fetchone()
            return int(count)

        return await self.db.read(job)


def _create(
    conn: sqlite3.Connection, request: TripRequest, fingerprint: str, body: str
) -> tuple[Trip, bool]:
    failpoints.hit("coordinator.create_trip")
    row = conn.execute(
        "SELECT trip_id, fingerprint FROM idempotency_keys WHERE key = ?",
        (request.idempotency_key,),
    ).fetchone()
    if row is not None:
        if row["fingerprint"] != fingerprint:
            raise CoordinatorError(
                f"idempotency_key {quote(request.idempotency_key)} was already used for trip"
                f" {row['trip_id']} with different parameters",
                kind=ErrorKind.CONFLICT,
            )
        trip = _get(conn, row["trip_id"])
        assert trip is not None
        return trip, True
    trip_id = "trip-" + uuid.uuid4().hex[:20]
    now = time.time()
    conn.execute(
        "INSERT INTO trips (trip_id, protocol, status, request, created_at, updated_at)"
        " VALUES (?, ?, 'pending', ?, ?, ?)",
        (trip_id, request.protocol.value, body, now, now),
    )
    conn.executemany(
        "INSERT INTO legs (trip_id, kind, reservation_id, status) VALUES (?, ?, ?, ?)",
        [
            (trip_id, kind.value, reservation_id(trip_id, kind), LegStatus.NOT_STARTED.value)
            for kind in LEG_ORDER
        ],
    )
    conn.execute(
        "INSERT INTO idempotency_keys (key, trip_id, fingerprint, created_at) VALUES (?, ?, ?, ?)",
        (request.idempotency_key, trip_id, fingerprint, now),
    )
    _add_events(conn, trip_id, (TripEvent("created", detail=request.protocol.value, at=now),))
    legs = tuple(
        Leg(kind, reservation_id(trip_id, kind), LegStatus.NOT_STARTED, 0, "") for kind in LEG_ORDER
    )
    return Trip(trip_id, request, TripStatus.PENDING, None, legs, "", now, now), False


def _add_events(conn: sqlite3.Connection, trip_id: str, events: Iterable[TripEvent]) -> None:
    conn.executemany(
        "INSERT INTO events (trip_id, at, kind, leg, detail, actor) VALUES (?, ?, ?, ?, ?, ?)",
        [(trip_id, e.at, e.kind, e.leg, e.detail, e.actor) for e in events],
    )


def _write(conn: sqlite3.Connection, trip_id: str, change: Change, now: float) -> None:
    sets: list[str] = ["updated_at = ?"]
    args: list[object] = [now]
    if change.status is not None:
        sets.append("status = ?, attention = ?, attention_detail = ?")
        attention = change.attention.value if change.attention is not None else None
        args += [change.status.value, attention, change.attention_detail]
    if change.decision is not None:
        sets.append("decision = ?")
        args.append(change.decision.value)
    if change.failure_reason is not None:
        sets.append("failure_reason = ?")
        args.append(change.failure_reason)
    conn.execute(f"UPDATE trips SET {', '.join(sets)} WHERE trip_id = ?", (*args, trip_id))
    if change.legs:
        conn.executemany(
            "UPDATE legs SET status = ?, reason = ?,"
            " price_cents = coalesce(?, price_cents) WHERE trip_id = ? AND kind = ?",
            [
                (u.status.value, u.reason, u.price_cents, trip_id, kind.value)
                for kind, u in change.legs.items()
            ],
        )
    _add_events(conn, trip_id, change.events)


def _events(conn: sqlite3.Connection, trip_id: str) -> list[TripEvent]:
    return [
        TripEvent(r["kind"], r["leg"], r["detail"], r["actor"], r["at"])
        for r in conn.execute(
            "SELECT kind, leg, detail, actor, at FROM events WHERE trip_id = ? ORDER BY seq",
            (trip_id,),
        )
    ]


def _get(conn: sqlite3.Connection, trip_id: str) -> Trip | None:
    row = conn.execute("SELECT * FROM trips WHERE trip_id = ?", (trip_id,)).fetchone()
    if row is None:
        return None
    legs = conn.execute("SELECT * FROM legs WHERE trip_id = ?", (trip_id,)).fetchall()
    return trip_from_rows(row, legs)


_CUSTOMER = "json_extract(request, '$.customer_id')"
_KEY = "json_extract(request, '$.idempotency_key')"


def _page(
    conn: sqlite3.Connection, query: TripQuery, before: int, limit: int
) -> tuple[list[Trip], int | None]:
    """A page of trips in two statements: the trips, then all of their legs."""
    sql = "SELECT rowid AS seq, * FROM trips WHERE 1 = 1"
    where, args = page_filter(query, before, seq="rowid", customer=_CUSTOMER, key=_KEY, mark="?")
    sql += where
    rows = conn.execute(sql + " ORDER BY rowid DESC LIMIT ?", (*args, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    legs: dict[str, list[sqlite3.Row]] = {r["trip_id"]: [] for r in rows}
    if rows:
        marks = ", ".join("?" * len(rows))
        for leg in conn.execute(f"SELECT * FROM legs WHERE trip_id IN ({marks})", list(legs)):
            legs[leg["trip_id"]].append(leg)
    trips = [trip_from_rows(r, legs[r["trip_id"]]) for r in rows]
    return trips, (rows[-1]["seq"] if more else None)
